"""What the backend knows about the Python frame Dynamo is compiling: which module it runs in (so a
fragment's module paths can be made absolute), and whether Dynamo may stop compiling it.

Dynamo compiles a frame again for each new guard failure, up to `torch._dynamo.config.recompile_limit`
(8). Past it, Dynamo logs one warning and runs the frame's *original* bytecode from then on: for a
frame we rewrote, that is the model without the plan (every indexer full), a different answer with
only a log line. `watch_recompile_limit` turns that into `RecompileLimitError` for the frames the
plan touched; other frames keep Dynamo's behaviour.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import IndexCacheError


class RecompileLimitError(IndexCacheError, RuntimeError):
    """Dynamo hit its recompile limit on a frame the plan rewrote and would run it un-rewritten."""


class RecompileLimitWarning(UserWarning):
    """A frame the plan rewrote got its last compile Dynamo allows; one more runs it un-rewritten."""


# Dynamo frame id -> (function, what the plan does in it). The function is checked too: frame ids
# restart after torch._dynamo.reset(), and may then name another function.
_plan_frames: dict[int, tuple[str, str]] = {}
_plan_functions: dict[str, str] = {}  # "'forward' (file:line)" -> what (when no frame id is logged)
_LIMIT_MESSAGE = "torch._dynamo hit config."
_FIX = ("Let decode shapes be dynamic: torch.compile(..., dynamic=None) (the default: the second shape "
        "seen compiles a symbolic graph) or dynamic=True, or torch._dynamo.mark_dynamic on the growing "
        "length; or raise torch._dynamo.config.recompile_limit above the number of distinct shapes you run")


def current_frame():
    """Dynamo's translator for the frame being compiled (None outside a Dynamo compile)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    try:
        return InstructionTranslator.current_tx()
    except (AttributeError, IndexError, RuntimeError):
        return None


def frame_module(tx=None) -> nn.Module | None:
    """The module whose method is being compiled (`self` of model.forward, or of a layer's forward
    when a graph break inside it made Dynamo compile that frame on its own)."""
    tx = tx or current_frame()
    owner = getattr(tx, "f_locals", {}).get("self") if tx is not None else None
    return owner if isinstance(owner, nn.Module) else None


def function_info(code) -> str:
    """Dynamo's own spelling of a code object in its recompile-limit warning."""
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def note_plan_frame(what: str) -> None:
    """Record that the frame being compiled holds plan work (`what`, for messages), and warn once
    when this is the last compile Dynamo allows it."""
    from torch._guards import CompileContext
    compile_id = CompileContext.current_compile_id()
    tx = current_frame()
    info = function_info(tx.f_code) if tx is not None else "?"
    if compile_id is not None:
        _plan_frames[compile_id.frame_id] = (info, what)
        _warn_if_last(compile_id.frame_compile_id, info, what)
    if tx is not None:
        _plan_functions[info] = what
    _note_callers(what)  # always: the config that used to say whether a skip recurses is deprecated (torch 2.13)
    watch_recompile_limit()


def _note_callers(what: str) -> None:
    """The functions running above this frame (e.g. HF's deprecate_kwarg `wrapped_func` around a
    layer's forward, shared by every decorated module and so recompiled for each): when one of them
    hits the recompile limit, Dynamo runs it *and everything it calls* without compiling
    (skip_code_recursive_on_recompile_limit_hit), this frame included."""
    frame = sys._getframe(2)
    while frame is not None:
        info = function_info(frame.f_code)
        if "torch/" not in frame.f_code.co_filename.replace("\\", "/"):
            _plan_functions.setdefault(info, f"it calls a frame the plan rewrote: {what}")
        frame = frame.f_back


def _warn_if_last(frame_compile_id: int | None, info: str, what: str) -> None:
    limit = torch._dynamo.config.recompile_limit
    if frame_compile_id is not None and frame_compile_id + 1 == limit:
        warnings.warn(f"indexcache: frame {info} ({what}) was compiled {limit} times, "
                      f"torch._dynamo.config.recompile_limit; the next new shape will raise "
                      f"RecompileLimitError. {_FIX}.", RecompileLimitWarning, stacklevel=4)


class _RecompileLimitFilter(logging.Filter):
    """Raises from Dynamo's recompile-limit warning when the frame is one the plan rewrote: the
    warning is logged inside Dynamo's compile of that frame, so the error reaches the caller
    instead of the frame falling back to its original code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_LIMIT_MESSAGE) or not isinstance(record.args, tuple):
            return True
        what = _planned(record.args)
        if what is None:
            return True
        limit_type, limit, function, reason = record.args[:4]
        raise RecompileLimitError(
            f"indexcache: Dynamo hit torch._dynamo.config.{limit_type} ({limit}) for {function}, a frame "
            f"the IndexCache plan rewrote ({what}). Dynamo would now run that frame's original code: "
            f"every indexer full, the plan silently ignored. Last recompile reason: {reason}. {_FIX}.")


def _planned(args: tuple) -> str | None:
    function, reason = (args[2], args[3]) if len(args) >= 4 else (None, None)
    frame = re.match(r"\s*(\d+)/\d+", str(reason or ""))
    if frame:
        planned_function, what = _plan_frames.get(int(frame.group(1)), (None, None))
        if planned_function == str(function):
            return what
    return _plan_functions.get(str(function))


_filter = _RecompileLimitFilter()


def watch_recompile_limit() -> None:
    """Idempotent: attach the filter to the logger Dynamo's recompile-limit warning goes through."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _filter not in logger.filters:
        logger.addFilter(_filter)


@dataclass
class FrameLayout:
    """Where the frame being compiled sits in the whole model."""
    model: nn.Module  # the outermost module on the call stack that holds the frame's `self`
    prefix: str  # the frame's `self` within `model` ('' when it is the model)
    indexers: list[str]  # module paths of the model's indexers, in model order (one plan entry each)

    def position(self, path: str) -> int | None:
        """Plan position of the indexer whose module holds `path` (longest match), else None."""
        owners = [i for i, p in enumerate(self.indexers) if path == p or path.startswith(p + ".")]
        return max(owners, key=lambda i: len(self.indexers[i]), default=None)

    def holds_indexer_code(self, paths) -> bool:
        return any(self.position(p) is not None for p in paths)


def frame_layout() -> FrameLayout | None:
    """None outside a Dynamo compile or with no module on the call stack. A frame that is not a
    module's method (a helper function Dynamo compiles on its own after a break) gets the
    outermost calling module as its model and no prefix (its nodes have no module path)."""
    module = frame_module()
    model = _outermost_caller_holding(module)
    if model is None:
        return None
    from .reference import find_indexer_modules
    indexer_ids = {id(m) for m in find_indexer_modules(model)}
    names = {}
    for name, sub in model.named_modules():
        names.setdefault(id(sub), name)
    return FrameLayout(model, names.get(id(module), ""),
                       [name for name, sub in model.named_modules() if id(sub) in indexer_ids])


def _outermost_caller_holding(module: nn.Module | None) -> nn.Module | None:
    """Walks the Python stack: a layer's frame compiled on its own (a graph break inside it) is
    called from the model's forward, which is still running; the model is the outermost `self`
    that contains the layer. (torch.compile's OptimizedModule wrapper is skipped: its
    `_orig_mod.` prefix is not in the model's own module paths.)"""
    from torch._dynamo.eval_frame import OptimizedModule
    outermost, frame = module, sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, nn.Module) and not isinstance(owner, OptimizedModule) and owner is not outermost:
            if outermost is None or any(sub is outermost for sub in owner.modules()):
                outermost = owner
        frame = frame.f_back
    return outermost


def pin_frame_to_module() -> None:
    """Make Dynamo guard on the identity of the frame's `self`: a layer's fragment is rewritten for
    that layer's plan role (F, S reading layer j, ...), and without this guard Dynamo would reuse
    the graph for the next layer of the same class. With an ID_MATCH guard Dynamo also counts
    recompile_limit per module instance (torch/_dynamo/cache_size.py), as it does for frames of
    modules it guards by id itself."""
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._dynamo.source import LocalSource
    install_guard(LocalSource("self").make_guard(GuardBuilder.ID_MATCH))


FRAGMENT_RECOMPILE_LIMIT = 64


def allow_fragment_recompiles() -> None:
    """A model that compiles into fragments recompiles small shared frames once per caller and per
    shape: HF's deprecate_kwarg `wrapped_func` runs around every decorated module's forward and hit
    the default limit (8) on the second decode step of a 4-layer DeepSeek-V3.2 with a MoE graph
    break, after which Dynamo ran it and the layers under it uncompiled (un-rewritten). Raising the
    limit costs nothing for frames that do not recompile; past it, RecompileLimitError is raised."""
    limit = torch._dynamo.config.recompile_limit
    if limit >= FRAGMENT_RECOMPILE_LIMIT:
        return
    torch._dynamo.config.recompile_limit = FRAGMENT_RECOMPILE_LIMIT
    warnings.warn(f"indexcache: the model compiles into several graphs (graph breaks), so shared frames "
                  f"recompile per layer and per shape; torch._dynamo.config.recompile_limit raised from "
                  f"{limit} to {FRAGMENT_RECOMPILE_LIMIT} (a frame that still hits it raises "
                  "RecompileLimitError). fullgraph=True avoids both.", RecompileLimitWarning, stacklevel=4)
