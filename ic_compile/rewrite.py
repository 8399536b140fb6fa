"""The IndexCache rewrite: detect -> bind plan -> forward indices -> drop dead work.

`rewrite(gm, plan)` never modifies `gm`; it returns a rewritten copy and what was done.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import fx

from ic_compile.passes.bind_plan import FragmentBinding, LayerBinding, bind_fragment, bind_plan
from ic_compile.passes.detect_indexers import Detection, detect_indexers
from ic_compile.passes.drop_shared_key_cache import CacheWrite, drop_shared_key_cache, find_shared_key_caches
from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.forward_indices import forward_indices
from ic_compile.passes.lower_indexer import LoweringReport, lower_indexer
from ic_compile.passes.lower_sparse_attention import lower_sparse_attention
from ic_compile.passes.graph_ops import (add_inputs, add_outputs, layer_number, module_path, op_name, shape_of,
                                         topk_item_users)

from .frames import FrameLayout
from .plan import FULL, LayerPlan, PlanError


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

    @property
    def passes_through(self) -> bool:
        """A graph fragment of a DSA model that holds none of its indexers: left untouched."""
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
            sparse_attention: bool = True, indexer_mask: str = "ranges", indexer_precision: str = "bf16",
            layout: FrameLayout | None = None) -> RewriteResult:
    """kernels=True also lowers each F indexer to the fused `ic::indexer_topk` op and the
    scatter-to-mask + dense SDPA it feeds to `ic::sparse_attention` (unless sparse_attention=False).
    indexer_mask: how the model's mask reaches that op, "ranges" (per-query key ranges) or "dense".
    indexer_precision: that op's score precision, "bf16" (the model's) or "fp8" (DeepSeek-V3.2's).
    layout (the backend's): where this graph's frame sits in the whole model. When the graph holds
    only some of the model's indexers (graph breaks), it is bound as a fragment: S layers whose F
    source is elsewhere read its top-k from the index store, F layers that later fragments read
    write it there (`result.fragment`; the caller wraps the compiled graph with `with_store`)."""
    work = eliminate_dead_code(copy_graph_module(gm))  # baseline: what was dead already isn't ours
    baseline = {n.name for n in work.graph.nodes}
    detection = detect_indexers(work, layout.prefix if layout else "")
    result = RewriteResult(gm, gm, detection, None, layout=layout)
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
        _check_no_indexer_code(work, result)
        return result
    if _is_fragment(detection, layout):
        steps = _bind_fragment(result, plan, layout)
    else:
        result.plan = LayerPlan.coerce(plan, len(detection.matches)) or LayerPlan.all_full(len(detection.matches))
        result.bindings = bind_plan(detection.matches, result.plan)
        steps = []
    shared = [b for b in result.bindings if b.role != FULL and b.source is not b.match]
    result.caches = find_shared_key_caches(result.bindings)
    full = [b.match for b in result.bindings if b.role == "F"]
    steps += [lambda g: forward_indices(g, shared), eliminate_dead_code,
              lambda g: drop_shared_key_cache(g, result.caches)]
    if kernels:
        steps += [lambda g: lower_indexer(g, full, result.kernels, indexer_mask, indexer_precision)]
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


def _is_fragment(detection: Detection, layout: FrameLayout | None) -> bool:
    """Does the graph hold some, not all, of the model's indexers? (Without a layout, or when the
    model names no indexer modules, the graph is taken to be the whole model, as before.)"""
    if layout is None or not layout.indexers:
        return False
    found = {layout.position(m.module) for m in detection.matches}
    if None in found and len(detection.matches) == len(layout.indexers):
        return False  # the name-based module list disagrees with detection: trust the graph, as before
    return found != set(range(len(layout.indexers)))


def _check_no_indexer_code(work: fx.GraphModule, result: RewriteResult) -> None:
    """A fragment passes through only if it really holds no indexer: code under one of the model's
    indexer modules that detection did not recognise would otherwise run un-rewritten, silently."""
    layout = result.layout
    if layout is None or not layout.indexers:
        return
    paths = {".".join(p for p in (layout.prefix, module_path(n)) if p) for n in work.graph.nodes
             if op_name(n) == "topk"}
    if layout.holds_indexer_code(paths):
        raise PlanError(f"{result.message}, yet the graph has a topk inside the model's indexer module(s) "
                        f"{sorted(p for p in paths if layout.position(p) is not None)}: an indexer variant "
                        "ic-compile does not recognise. Run ic_compile.explain on the model to see why.")


def _bind_fragment(result: RewriteResult, plan, layout: FrameLayout) -> list:
    """Bind a graph holding some of the model's indexers by their plan positions over the whole
    model; returns the graph edits that connect it to the index store."""
    total = len(layout.indexers)
    positions = [layout.position(m.module) for m in result.detection.matches]
    if None in positions:
        stray = [m.module for m, p in zip(result.detection.matches, positions) if p is None]
        raise PlanError(f"indexer(s) at {stray} are not inside any of the model's {total} indexer modules "
                        f"({layout.indexers[0]}, ...), so their plan position across graph fragments is "
                        "unknown. Compile with fullgraph=True (one graph, ordered by layer number).")
    result.plan = LayerPlan.coerce(plan, total) or LayerPlan.all_full(total)
    if len(result.plan) != total:
        raise PlanError(f"plan {result.plan.pattern!r} has {len(result.plan)} layers but the model has {total} "
                        f"indexer modules ({layout.indexers[0]} ... {layout.indexers[-1]}); this graph "
                        f"fragment holds {len(positions)} of them (plan positions {sorted(positions)}). "
                        "Give exactly one 'F'/'S' per indexer layer of the whole model.")
    result.fragment = bind_fragment(result.detection.matches, positions, result.plan)
    result.bindings = result.fragment.bindings
    return [lambda g: _connect_store(g, result.fragment)]


def _connect_store(gm: fx.GraphModule, fragment: FragmentBinding) -> fx.GraphModule:
    """S layers reading the store: their topk's uses become new graph inputs (their indexer then
    dies with DCE). F layers writing it: (values, indices) become extra graph outputs."""
    for read in fragment.reads:
        users = topk_item_users(read.match.topk)
        read.items = tuple(sorted(users))
        read.shapes = tuple(shape_of(users[item][0]) for item in read.items)
        placeholders = add_inputs(gm, [(f"ic_index_store_{read.layer}_from_{read.source}_{item}", users[item][0])
                                       for item in read.items])
        for item, placeholder in zip(read.items, placeholders):
            _mark_store_input(placeholder)
            for user in users[item]:
                user.replace_all_uses_with(placeholder)
                gm.graph.erase_node(user)
    if fragment.writes:
        add_outputs(gm, [(w.match.topk, item) for w in fragment.writes for item in (0, 1)])
    return gm


def _mark_store_input(placeholder: fx.Node) -> None:
    """AOTAutograd maps every input of a Dynamo graph to its source (for aliasing guards and to find
    static inputs); the store's inputs are not in the frame, so they get a local of their own name,
    which nothing reads (they never alias another input: they are fresh topk outputs)."""
    from torch._dynamo.source import LocalSource
    placeholder._dynamo_source = LocalSource(placeholder.name)


def _removed_nodes(before: fx.GraphModule, baseline: set, after: fx.GraphModule) -> list[RemovedNode]:
    kept = {n.name for n in after.graph.nodes}
    removed = []
    for node in before.graph.nodes:
        if node.name in kept or node.name not in baseline or node.op not in ("call_function", "call_method"):
            continue
        path = module_path(node)
        removed.append(RemovedNode(node.name, op_name(node), path, layer_number(path)))
    return removed
