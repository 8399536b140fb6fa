"""What a new user's fresh install gets: tested library ranges and a repo root that shadows nothing."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from ic_compile.versions import declared_ranges, untested_installed, untested_message

REPO = Path(__file__).resolve().parent.parent


def run_in_repo_root(code: str) -> subprocess.CompletedProcess:
    """`python -c CODE` from the repo root: the root is sys.path[0], as for `python -m pytest`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_installed_libraries_are_in_the_tested_range():
    messages = untested_installed()
    assert not messages, "\n".join(messages)


def test_untested_version_message_names_the_range_and_the_fix():
    message = untested_message("transformers", "5.27.0", ">=5.24,<5.26")
    assert message == ("transformers 5.27.0 is installed, but ic-compile is tested with "
                       "transformers>=5.24,<5.26 (pyproject.toml). Install a tested release: "
                       "pip install 'transformers>=5.24,<5.26'")
    assert untested_message("transformers", "5.25.0", ">=5.24,<5.26") is None
    assert untested_message("onnx", "1.16.0", ">=1.17,<1.24") is not None


def test_declared_ranges_are_the_ones_pyproject_declares():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {r.name: r.specifier for r in map(Requirement, extras["hf"] + extras["onnx"])}
    ranges = declared_ranges()
    for package in ("transformers", "onnx", "onnxruntime", "onnxscript"):
        assert any(spec.operator == "<" for spec in declared[package]), (
            f"{package} has no upper bound in pyproject.toml")
        assert SpecifierSet(ranges[package]) == declared[package], (
            f"the installed metadata says {ranges[package]}, pyproject.toml says "
            f"{declared[package]}: reinstall with pip install -e '.[dev]'")


def test_repo_root_kernels_folder_does_not_shadow_the_installed_kernels_package():
    # transformers >= 5.25 imports PyPI's `kernels`; from the repo root our kernels/ folder is
    # importable under that name unless it hands the import on.
    result = run_in_repo_root("import transformers.integrations.hub_kernels, kernels; "
                              "print(kernels.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not Path(result.stdout.strip()).resolve().is_relative_to(REPO), result.stdout


def test_repo_root_passes_folder_is_not_a_top_level_package():
    result = run_in_repo_root("import importlib.util; import passes; print(passes.__file__)")
    if result.returncode == 0:   # some installed `passes` package: it must be that one, not ours
        assert not Path(result.stdout.strip()).resolve().is_relative_to(REPO), result.stdout
    else:
        assert "No module named 'passes' (the folder" in result.stderr
        assert "is ic_compile.passes; import it under that name" in result.stderr


def test_our_packages_import_under_their_real_names_from_the_repo_root():
    result = run_in_repo_root("import ic_compile.kernels.ops, ic_compile.passes.detect_indexers as d; "
                              "print(d.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).resolve() == REPO / "passes" / "detect_indexers.py"


def test_ic_cli_runs_from_the_repo_root():
    ic = Path(sys.executable).parent / "ic"
    result = subprocess.run([str(ic), "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "explain" in result.stdout
