"""Which versions of the libraries whose internals we depend on were tested.

The ranges live in one place, pyproject.toml (the `hf` and `onnx` extras), and are read back from
the installed distribution's metadata. transformers: we read its model classes' graphs, cache
classes (DynamicCache/StaticCache) and config fields; onnx/onnxruntime/onnxscript: the exporter's
decompositions and the runtime's TopK. A release outside the range may work, but was not tested.
"""

from __future__ import annotations

import importlib.metadata
import warnings

from packaging.requirements import Requirement
from packaging.version import Version

DISTRIBUTION = "ic-compile"
CHECKED = ("transformers", "onnx", "onnxruntime", "onnxscript")


class UntestedVersionWarning(UserWarning):
    """An installed library is outside the range ic-compile was tested with."""


def declared_ranges() -> dict[str, str]:
    """{package: specifier} for CHECKED packages, from ic-compile's declared requirements."""
    ranges = {}
    for line in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.name in CHECKED and str(requirement.specifier):
            ranges.setdefault(requirement.name, str(requirement.specifier))
    return ranges


def untested_message(package: str, installed: str, specifier: str) -> str | None:
    """The complaint for `package==installed` against `specifier`, or None when it is in range."""
    if Requirement(f"{package}{specifier}").specifier.contains(Version(installed), prereleases=True):
        return None
    return (f"{package} {installed} is installed, but ic-compile is tested with {package}{specifier} "
            f"(pyproject.toml). Install a tested release: pip install '{package}{specifier}'")


def untested_installed() -> list[str]:
    """One message per installed CHECKED package outside its tested range (absent ones are fine)."""
    messages = []
    for package, specifier in declared_ranges().items():
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        message = untested_message(package, installed, specifier)
        if message:
            messages.append(message)
    return messages


def warn_untested() -> None:
    for message in untested_installed():
        warnings.warn(message, UntestedVersionWarning, stacklevel=3)
