"""The IndexCache rewrite: the pass pipeline (`passes/manager.py`) on a copy of Dynamo's graph.

`rewrite(gm, plan)` never modifies `gm`; it returns a rewritten copy and what was done.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import fx

from ic_compile.passes.bind_plan import FragmentBinding, LayerBinding
from ic_compile.passes.detect_indexers import Detection
from ic_compile.passes.drop_shared_key_cache import CacheWrite
from ic_compile.passes.graph_ops import layer_number, module_path, op_name
from ic_compile.passes.lower_indexer import LoweringReport
from ic_compile.passes.manager import PassContext, indexer_free_pipeline, pipeline, run_passes

from .frames import FrameLayout
from .plan import LayerPlan, PlanError


class NoIndexerFoundError(PlanError):
    """The graph holds no lightning indexer, so a plan cannot be applied."""


class DetectionUncertainWarning(UserWarning):
    """Some topk could not be classified with confidence; the graph was left unchanged."""


@dataclass
class RemovedNode:
    name: str
    op: str  # torch-level op name, e.g. "matmul"
    module: str  # module path, e.g. "model.layers.1.self_attn.indexer"
    layer: int | None


@dataclass
class RewriteResult:
    gm: fx.GraphModule  # the rewritten copy (the input itself when unchanged)
    original: fx.GraphModule
    detection: Detection
    plan: LayerPlan | None
    bindings: list[LayerBinding] = field(default_factory=list)
    caches: list[CacheWrite] = field(default_factory=list)
    removed: list[RemovedNode] = field(default_factory=list)
    kernels: LoweringReport = field(default_factory=LoweringReport)
    changed: bool = False
    message: str = ""  # why nothing changed, when nothing changed
    fragment: FragmentBinding | None = None  # set when the graph holds only some of the model's indexers
    layout: FrameLayout | None = None  # where the graph's frame sits in the whole model (backend only)
    counters: Counter = field(default_factory=Counter)  # what each pass matched and edited (PassContext.counters)

    @property
    def passes_through(self) -> bool:
        """A graph fragment of a DSA model that holds none of its indexers: the plan leaves it alone
        (with kernels its MoE experts may still be lowered: `_lower_indexer_free`)."""
        return (not self.detection.matches and self.detection.confident and self.layout is not None
                and bool(self.layout.indexers))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy that still reads as Dynamo's graph: its meta (dynamo_compile_id), parameter sources and
    each placeholder's _dynamo_source, from which AOTAutograd finds the static inputs (parameters,
    inputs marked with mark_static_address such as HF's StaticCache tensors). Without them Inductor's
    CUDA graphs copy every weight into the graph on each replay and skip graphs that write a cache."""
    graph, copies = fx.Graph(), {}
    output = graph.graph_copy(gm.graph, copies)
    graph.output(output)
    copied = fx.GraphModule(gm, graph)
    copied.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copied._param_name_to_source = gm._param_name_to_source
    for node, copy in copies.items():
        if hasattr(node, "_dynamo_source"):
            copy._dynamo_source = node._dynamo_source
    return copied


def rewrite(gm: fx.GraphModule, plan=None, *, strict: bool = False, kernels: bool = False,
            sparse_attention: bool = True, moe_experts: bool = True, moe_router: bool = True,
            merge_linears: bool = True, indexer_mask: str = "ranges",
            indexer_precision: str = "bf16", layout: FrameLayout | None = None, lowering: str = "inductor",
            example_inputs=None) -> RewriteResult:
    """kernels=True also lowers each F indexer to the fused `ic::indexer_topk` op and the
    scatter-to-mask + dense SDPA it feeds to `ic::sparse_attention` (unless sparse_attention=False).
    indexer_mask: how the model's mask reaches that op, "ranges" (per-query key ranges), "dense",
    or "auto" (decided per graph from `lowering`, what compiles the graph afterwards, and whether
    it is a decode graph: `passes.lower_indexer.decide_indexer_mask`).
    indexer_precision: that op's score precision, "bf16" (the model's) or "fp8" (DeepSeek-V3.2's).
    layout (the backend's): where this graph's frame sits in the whole model. When the graph holds
    only some of the model's indexers (graph breaks), it is bound as a fragment: S layers whose F
    source is elsewhere read its top-k from the index store, F layers that later fragments read
    write it there (`result.fragment`; the caller wraps the compiled graph with `with_store`).
    moe_experts (with kernels=True): a few-token MoE experts module -> `ic::moe_experts`, only after
    both ran on the same random routings with the weights of example_inputs (the backend's, one per
    placeholder; `passes.lower_moe_experts`), a shared expert added to its output folded into the same
    call, checked alike (`passes.fold_shared_expert`); without them it is left alone. moe_router (with kernels):
    a DeepSeek-V3-style router's tail (sigmoid, bias, groups, top-k, normalise) -> `ic::moe_route`, also
    checked on random logits first (`passes.lower_moe_router`), and routed inside the experts' call
    where that call alone reads it (`passes.fold_moe_route`). merge_linears (with kernels): bias-free
    linears of one few-token input (decode), and lone one-token GEMVs, -> one `ic::multi_linear` each
    (`passes.lower_decode_linears`), an RMSNorm read by one such call alone folded into it
    (`passes.fold_rms_norm`)."""
    ctx = PassContext(plan_spec=plan, layout=layout, kernels=kernels, sparse_attention=sparse_attention,
                      moe_experts=moe_experts, moe_router=moe_router, merge_linears=merge_linears,
                      indexer_mask=indexer_mask, lowering=lowering,
                      indexer_precision=indexer_precision, input_values=_by_placeholder(gm, example_inputs))
    work = run_passes(copy_graph_module(gm), ctx, pipeline(ctx))
    result = RewriteResult(gm, gm, ctx.detection, ctx.plan, layout=layout, counters=ctx.counters)
    if ctx.stopped:
        result.message = ctx.stopped
        if not ctx.detection.confident:
            if strict:
                raise PlanError(result.message)
            warnings.warn(result.message, DetectionUncertainWarning, stacklevel=2)
        elif result.passes_through:
            _lower_indexer_free(gm, ctx, result)
        return result
    result.gm, result.changed = work, True
    result.bindings, result.fragment, result.caches, result.kernels = (ctx.bindings, ctx.fragment, ctx.caches,
                                                                       ctx.report)
    result.removed = _removed_nodes(gm, ctx, work)
    return result


def _lower_indexer_free(gm: fx.GraphModule, ctx: PassContext, result: RewriteResult) -> None:
    """A DSA model's fragment without indexers: the plan leaves it alone (result.changed stays False),
    but with kernels its MoE experts and trivial router top-k are lowered as in any other graph
    (result.gm the lowered copy, result.kernels / counters what was done)."""
    passes = indexer_free_pipeline(ctx)
    if not passes:
        return
    message, ctx.stopped = ctx.stopped, ""
    work = run_passes(copy_graph_module(gm), ctx, passes)
    ctx.stopped = message
    if (ctx.report.moe_lowered or ctx.report.moe_router_lowered or ctx.report.decode_linears
            or ctx.counters["drop_trivial_topk.replaced"]):
        result.gm, result.kernels, result.counters = work, ctx.report, ctx.counters


def _by_placeholder(gm: fx.GraphModule, example_inputs) -> dict | None:
    if example_inputs is None:
        return None
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))


def _removed_nodes(before: fx.GraphModule, ctx: PassContext, after: fx.GraphModule) -> list[RemovedNode]:
    """The original graph's ops the rewrite removed; not those dead already, which the pipeline's
    first pass, a plain DCE, took out (the copy keeps the original's node names)."""
    kept, dead_already = {n.name for n in after.graph.nodes}, ctx.stats[0].removed
    removed = []
    for node in before.graph.nodes:
        if node.name in kept or node.name in dead_already or node.op not in ("call_function", "call_method"):
            continue
        path = module_path(node)
        removed.append(RemovedNode(node.name, op_name(node), path, layer_number(path)))
    return removed
