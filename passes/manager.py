"""The pass contract, the one ordered pipeline, and the runner that logs and counts between passes.

Every pass is `pass_(gm, ctx) -> gm`: it edits `gm` in place (or returns a replacement) and reads
and writes what passes share through `ctx`. `pipeline(ctx)` is the only place their order is set;
`run_passes` lints the graph after each one, so a broken graph is blamed on the pass that broke it.

Logging: `logging.getLogger("ic_compile.passes")` gets one INFO line per pass (nodes left, removed,
added, time, the pass's counters) and, at DEBUG, the whole graph after it:

    logging.basicConfig()
    logging.getLogger("ic_compile.passes").setLevel(logging.DEBUG)  # INFO: the summaries only

Counters (Inductor style): passes count what they matched or edited in `ctx.counters`
("forward_indices.shared_topk"); the runner adds "<pass>.nodes_removed" / "<pass>.nodes_added".
Each pass's increments are mirrored into `torch._dynamo.utils.counters["ic_compile"]`, which sums
them over every graph compiled in the process.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import fx

from ic_compile.plan import FULL, LayerPlan

from .bind_plan import FragmentBinding, LayerBinding
from .detect_indexers import Detection, IndexerMatch
from .drop_shared_key_cache import CacheWrite
from .lower_indexer import LoweringReport

if TYPE_CHECKING:
    from ic_compile.frames import FrameLayout

log = logging.getLogger("ic_compile.passes")


@dataclass
class PassStats:
    """What one pass did to the graph (node names: the copy keeps the original graph's names)."""
    name: str
    removed: set[str]
    added: set[str]
    nodes: int  # left after the pass
    seconds: float


@dataclass
class PassContext:
    """What the passes share. The first block is the caller's request; passes fill the rest."""
    plan_spec: Any = None  # the plan as given ("FSSF", LayerPlan, dict, path; None: all F); bind_plan coerces it
    layout: FrameLayout | None = None  # where the graph's frame sits in the model (backend only)
    kernels: bool = False  # include lower_indexer (+ lower_sparse_attention, lower_moe_experts, drop_trivial_topk)
    sparse_attention: bool = True
    moe_experts: bool = True
    moe_router: bool = True
    merge_linears: bool = True
    indexer_mask: str = "ranges"  # as asked: "auto" | "ranges" | "dense"; lower_indexer decides "auto"
    # what compiles the graph afterwards ("export": torch.export / ONNX); indexer_mask="auto" and
    # realize_rotary_table depend on it
    lowering: str = "inductor"
    indexer_precision: str = "bf16"
    input_values: dict[str, Any] | None = None  # placeholder name -> the graph's example input (backend only)

    detection: Detection | None = None  # detect
    stopped: str = ""  # set by a pass that leaves the graph unchanged: why; the pipeline ends there
    plan: LayerPlan | None = None  # bind_plan
    bindings: list[LayerBinding] = field(default_factory=list)  # bind_plan
    fragment: FragmentBinding | None = None  # bind_plan, when the graph holds some of the model's indexers
    caches: list[CacheWrite] = field(default_factory=list)  # bind_plan: state each S indexer keeps
    report: LoweringReport = field(default_factory=LoweringReport)  # lower_indexer, lower_sparse_attention
    counters: Counter = field(default_factory=Counter)
    stats: list[PassStats] = field(default_factory=list)  # run_passes, one per pass run

    @property
    def prefix(self) -> str:
        """Module path of the frame's `self` in the model ('' for the model's own frame)."""
        return self.layout.prefix if self.layout else ""

    @property
    def shared(self) -> list[LayerBinding]:
        """S layers that take an in-graph F source's top-k (store readers are bound to themselves)."""
        return [b for b in self.bindings if b.role != FULL and b.source is not b.match]

    @property
    def full(self) -> list[IndexerMatch]:
        return [b.match for b in self.bindings if b.role == FULL]


Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]


def pipeline(ctx: PassContext) -> list[Pass]:
    """The passes in order. The first DCE is the baseline (what was dead already is not the rewrite's
    doing); `detect` ends the pipeline when there is nothing it can rewrite."""
    from .bind_plan import bind_plan
    from .connect_index_store import connect_index_store
    from .detect_indexers import detect
    from .drop_shared_key_cache import drop_shared_key_cache
    from .drop_trivial_topk import drop_trivial_topk
    from .eliminate_dead_code import eliminate_dead_code
    from .forward_indices import forward_indices
    from .fp8_key_cache import fp8_key_cache
    from .lower_indexer import lower_indexer
    from .lower_sparse_attention import lower_sparse_attention
    from .realize_rotary_table import realize_rotary_table

    passes = [eliminate_dead_code, detect, bind_plan, connect_index_store, forward_indices, eliminate_dead_code,
              drop_shared_key_cache]
    if ctx.kernels:
        passes += [lower_indexer, *([fp8_key_cache] if ctx.indexer_precision == "fp8" else []),
                   *([lower_sparse_attention] if ctx.sparse_attention else []),
                   *_decode_op_passes(ctx), drop_trivial_topk, eliminate_dead_code,
                   *([realize_rotary_table] if ctx.lowering == "inductor" else [])]
    return passes


def indexer_free_pipeline(ctx: PassContext) -> list[Pass]:
    """With kernels, for a fragment of a DSA model that holds none of its indexers (a graph break
    between attention and MoE): the lowerings that do not involve the plan, so its MoE experts run
    in the same ops as in a fragment with indexers."""
    from .drop_trivial_topk import drop_trivial_topk
    from .eliminate_dead_code import eliminate_dead_code

    if not ctx.kernels:
        return []
    return [*_decode_op_passes(ctx), drop_trivial_topk, eliminate_dead_code]


def _decode_op_passes(ctx: PassContext) -> list[Pass]:
    """The lowerings to our MoE and GEMV ops, which do not involve the plan."""
    from .fold_moe_route import fold_moe_route
    from .fold_shared_expert import fold_shared_expert
    from .lower_moe_experts import lower_moe_experts
    from .lower_moe_router import lower_moe_router
    from .fold_rms_norm import fold_rms_norm
    from .lower_decode_linears import lower_decode_linears

    return [*([lower_moe_experts, fold_shared_expert] if ctx.moe_experts else []),
            *([lower_moe_router] if ctx.moe_router else []),
            *([fold_moe_route] if ctx.moe_experts and ctx.moe_router else []),
            *([lower_decode_linears, fold_rms_norm] if ctx.merge_linears else [])]


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass]) -> fx.GraphModule:
    """Run `passes` in order on `gm` (edited in place), until one sets `ctx.stopped`."""
    for pass_ in passes:
        if ctx.stopped:
            break
        gm = _run_one(pass_, gm, ctx)
    if not ctx.stopped:
        gm.recompile()
    return gm


def _run_one(pass_: Pass, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    name = pass_.__name__
    before, counted = {n.name for n in gm.graph.nodes}, Counter(ctx.counters)
    start = time.perf_counter()
    gm = pass_(gm, ctx)
    seconds = time.perf_counter() - start
    try:
        gm.graph.lint()
    except Exception as error:
        error.add_note(f"ic_compile: the graph is invalid after pass {name!r}")
        raise
    after = {n.name for n in gm.graph.nodes}
    stats = PassStats(name, before - after, after - before, len(after), seconds)
    ctx.stats.append(stats)
    ctx.counters[f"{name}.nodes_removed"] += len(stats.removed)
    ctx.counters[f"{name}.nodes_added"] += len(stats.added)
    for key in [key for key, n in ctx.counters.items() if not n]:
        del ctx.counters[key]  # passes may add 0 (`+= len(found)`): counters list what happened
    _mirror(ctx.counters - counted)  # counters only grow: the difference is this pass's increments
    _log(gm, stats, ctx.counters - counted)
    return gm


def _mirror(increments: Counter) -> None:
    from torch._dynamo.utils import counters
    counters["ic_compile"].update(increments)


def _log(gm: fx.GraphModule, stats: PassStats, increments: Counter) -> None:
    if log.isEnabledFor(logging.INFO):
        events = ", ".join(f"{key.split('.', 1)[1]}={n}" for key, n in sorted(increments.items())
                           if not key.endswith((".nodes_removed", ".nodes_added")))
        log.info("%s: %d nodes (-%d +%d) in %.1f ms%s", stats.name, stats.nodes, len(stats.removed),
                 len(stats.added), stats.seconds * 1e3, f"; {events}" if events else "")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("graph after %s:\n%s", stats.name, gm.print_readable(print_output=False))
