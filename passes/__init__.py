"""ic-compile graph passes: each GraphModule -> GraphModule."""

if __name__ != "ic_compile.passes":
    # This folder was imported as a top-level `passes` because the repo root is on sys.path
    # (`python -m pytest`, `python -c`, a script run from the root). Under that name it would shadow
    # an installed package (PyPI's `kernels` is imported by transformers). Hand the import to the
    # installed package, or fail as if this folder were not there. docs/architecture.md says why.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or ".") != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (the folder {_os.path.dirname(__file__)} is "
            f"ic_compile.passes; import it under that name)", name=__name__)
    _installed = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _installed   # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_installed)
