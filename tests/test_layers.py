"""The package's dependency rule (docs/architecture.md): core <- tools / export <- cli.

Core (ic_compile/*.py, passes/, kernels/) imports no tool, exporter or CLI module; tools and exporters
import neither each other nor the CLI. ic_compile/__init__.py, the public facade, is exempt. Lazy
imports inside functions count too: a lazy import is still a dependency."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGE_DIRS = {"passes": "ic_compile.passes", "kernels": "ic_compile.kernels"}  # installed under ic_compile
ALLOWED = {"core": {"core"}, "tools": {"core", "tools"}, "export": {"core", "export"},
           "cli": {"core", "tools", "export", "cli"}}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ic_compile" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in ("tools", "export", "cli") else "core"


def installed_name(path: Path) -> tuple[str, bool]:
    """(dotted module name as installed, whether it is a package's __init__)."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in SUBPACKAGE_DIRS:
        parts = SUBPACKAGE_DIRS[parts[0]].split(".") + parts[1:]
    is_package = parts[-1] == "__init__"
    return ".".join(p for p in parts if p != "__init__"), is_package


def imported_modules(tree: ast.AST, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                yield node.lineno, [node.module]
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, [target] if node.module else [f"{target}.{a.name}" for a in node.names]


def test_core_tools_export_cli_import_one_way():
    paths = sorted((REPO / "ic_compile").rglob("*.py")) + sorted(p for d in SUBPACKAGE_DIRS for p in (REPO / d).rglob("*.py"))
    checked, bad = 0, []
    for path in paths:
        module, is_package = installed_name(path)
        if module == "ic_compile":
            continue
        mine = layer(module)
        package = module if is_package else module.rsplit(".", 1)[0]
        for line, targets in imported_modules(ast.parse(path.read_text()), package):
            for target in targets:
                theirs = layer(target)
                if theirs is None:
                    continue
                checked += 1
                if theirs not in ALLOWED[mine]:
                    bad.append(f"{path.relative_to(REPO)}:{line}: {mine} module {module} imports {theirs} module {target}")
    assert checked > 100, "the check found almost no internal imports: is it reading the right tree?"
    assert not bad, "imports against core <- tools/export <- cli:\n" + "\n".join(bad)


def test_the_check_catches_a_core_module_importing_a_tool():
    tree = ast.parse("def f():\n    from .tools.search import search_plan\n")
    (_, (target,)), = imported_modules(tree, "ic_compile")
    assert layer("ic_compile.backend") == "core" and layer(target) == "tools" and "tools" not in ALLOWED["core"]
