"""The IndexCache rewrite: detect -> bind plan -> forward indices -> drop dead work.

`rewrite(gm, plan)` never modifies `gm`; it returns a rewritten copy and what was done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import fx

from ic_compile.passes.bind_plan import LayerBinding, bind_plan
from ic_compile.passes.detect_indexers import Detection, detect_indexers
from ic_compile.passes.drop_shared_key_cache import CacheWrite, drop_shared_key_cache, find_shared_key_caches
from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.forward_indices import forward_indices
from ic_compile.passes.lower_indexer import LoweringReport, lower_indexer
from ic_compile.passes.lower_sparse_attention import lower_sparse_attention
from ic_compile.passes.graph_ops import layer_number, module_path, op_name

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
            sparse_attention: bool = True, indexer_mask: str = "ranges") -> RewriteResult:
    """kernels=True also lowers each F indexer to the fused `ic::indexer_topk` op and the
    scatter-to-mask + dense SDPA it feeds to `ic::sparse_attention` (unless sparse_attention=False).
    indexer_mask: how the model's mask reaches that op, "ranges" (per-query key ranges) or "dense"."""
    work = eliminate_dead_code(copy_graph_module(gm))  # baseline: what was dead already isn't ours
    baseline = {n.name for n in work.graph.nodes}
    detection = detect_indexers(work)
    result = RewriteResult(gm, gm, detection, None)
    if not detection.confident:
        result.message = ("ic-compile left this graph unchanged: indexer detection is unsure — "
                          + "; ".join(detection.uncertain))
        if strict:
            raise PlanError(result.message)
        warnings.warn(result.message, DetectionUncertainWarning, stacklevel=2)
        return result
    if not detection.matches:
        result.message = (f"no lightning indexer found in a graph of {len(gm.graph.nodes)} nodes "
                          f"({len(detection.other_topk)} topk calls, none over ReLU(q·k) scores)")
        return result
    result.plan = LayerPlan.coerce(plan, len(detection.matches)) or LayerPlan.all_full(len(detection.matches))
    result.bindings = bind_plan(detection.matches, result.plan)
    result.caches = find_shared_key_caches(result.bindings)
    full = [b.match for b in result.bindings if b.role == "F"]
    steps = [lambda g: forward_indices(g, result.bindings), eliminate_dead_code,
             lambda g: drop_shared_key_cache(g, result.caches)]
    if kernels:
        steps += [lambda g: lower_indexer(g, full, result.kernels, indexer_mask)]
        if sparse_attention:
            steps += [lambda g: lower_sparse_attention(g, result.kernels)]
        steps += [eliminate_dead_code]
    for step in steps:
        work = step(work)
        work.graph.lint()
    work.recompile()
    result.gm, result.changed = work, True
    result.removed = _removed_nodes(gm, baseline, work)
    return result


def _removed_nodes(before: fx.GraphModule, baseline: set, after: fx.GraphModule) -> list[RemovedNode]:
    kept = {n.name for n in after.graph.nodes}
    removed = []
    for node in before.graph.nodes:
        if node.name in kept or node.name not in baseline or node.op not in ("call_function", "call_method"):
            continue
        path = module_path(node)
        removed.append(RemovedNode(node.name, op_name(node), path, layer_number(path)))
    return removed
