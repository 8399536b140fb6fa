"""Progress of the long subcommands: a tqdm bar over named stages, on stderr, for a person watching.
The library's long functions (`export_onnx`, `graph_diff`) take such a bar as `progress=`."""

from __future__ import annotations

import contextlib
import os
import sys


class Stages:
    """A tqdm bar over the named stages of a long command, on stderr; `with stages.step("capture")`."""

    def __init__(self, names: list[str], desc: str, enabled: bool | None = None):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=len(names), desc=desc, file=sys.stderr, leave=False,
                        disable=not (progress_enabled() if enabled is None else enabled),
                        bar_format="{desc}: stage {n}/{total} |{bar}| {elapsed}{postfix}")

    @contextlib.contextmanager
    def step(self, name: str):
        self.bar.set_postfix_str(name)
        yield
        self.bar.update(1)

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # also on errors: the error line must not land on the bar's line


def progress_enabled() -> bool:
    """Bars only for a person watching (IC_PROGRESS=0/1 forces it off/on)."""
    forced = os.environ.get("IC_PROGRESS")
    return forced != "0" if forced is not None else sys.stderr.isatty()
