"""Output paths checked before a long command's work: a real write test, since root passes
os.access everywhere (e.g. /proc). Used by the library (export) and the CLI alike."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import IndexCacheError


class OutputPathError(IndexCacheError, ValueError):
    """An output path that cannot be written; raised before any work starts."""


def output_dir(path, flag: str = "--out") -> Path:
    """Create the output directory now (as the command would later) and prove a file can be written
    in it; root ignores permission bits, so os.access is no test (e.g. /proc passes it)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {path}: exists and is not a directory; give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _probe(out)
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); "
                              "give a writable directory") from None
    return out


def output_file(path, flag: str = "--out") -> Path:
    """Check that `path` can be written (its folder exists and takes a file) without creating it."""
    out = Path(path)
    parent = out.parent
    if out.is_dir():
        raise OutputPathError(f"{flag} {path}: is a directory; give a file name inside it, e.g. "
                              f"{out / 'model.onnx'}")
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: directory {str(parent)!r} does not exist; create it first "
                              "or choose another path")
    try:
        _probe(parent)
        if out.exists():
            with open(out, "r+b"):
                pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); "
                              "give a writable path") from None
    return out


def _probe(folder: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".ic-write-test-"):
        pass
