"""Graph capture: the Dynamo FX graph(s) torch.compile hands a backend, each with where its frame sits
in the model, and their rewrite for one plan as the backend binds them. One implementation for the
tools (explain, graph diff, search) and the exporters; the `indexcache` backend itself receives its
graphs from torch.compile directly.

    recorder = capture(model, {"input_ids": ids, "use_cache": False})   # .graphs, .layouts, .inputs
    results = rewrite_graphs(recorder, "FSSF")                          # one RewriteResult per graph
    found = indexer_results(results, "explain", "nothing to share")     # those holding indexers

A model with graph breaks (MoE dispatch with `.tolist()`, a print between layers) is captured as
several graphs; those holding some of the model's indexers are bound as fragments (plan positions
over the whole model, top-k carried between them by the index store), exactly as the backend binds
them. `capture_graphs` returns the graphs alone.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import fx, nn

from ic_compile.passes.graph_ops import full_module_path

from .frames import FRAGMENT_RECOMPILE_LIMIT, FrameLayout, frame_layout, pin_frame_to_module
from .index_store import IndexStore, with_store
from .plan import PlanError
from .rewrite import NoIndexerFoundError, RewriteResult, rewrite


class GraphRecorder:
    """A torch.compile backend that keeps every graph Dynamo hands it, with its example inputs and its
    frame's layout in the model (`frames.frame_layout`, as the backend computes it).

    Each compiled graph runs as `gm.forward`, or, given `runner`, as `runner(slot)` looked up at every
    call (slot: the graph's index in `graphs`), so a caller can swap what runs without recompiling."""

    def __init__(self, runner: Callable[[int], Callable] | None = None):
        self.graphs: list[fx.GraphModule] = []
        self.inputs: list[list] = []  # per graph: what Dynamo passed (parameters, buffers, tensors, sizes)
        self.layouts: list[FrameLayout | None] = []  # per graph: its frame's place in the model
        self.runner = runner

    def __call__(self, gm: fx.GraphModule, example_inputs, **_options):
        slot = len(self.graphs)
        layout = frame_layout()
        self.graphs.append(gm)
        self.inputs.append(list(example_inputs))
        self.layouts.append(layout)
        if _layer_frame_with_indexer(gm, layout):
            # As the backend does: without the guard Dynamo would reuse layer 0's graph for every layer
            # of the same class, and the other layers' indexers would never be recorded.
            pin_frame_to_module()
        if self.runner is None:
            return gm.forward

        def run(*args):
            return self.runner(slot)(*args)
        return run


def _layer_frame_with_indexer(gm: fx.GraphModule, layout: FrameLayout | None) -> bool:
    """Is this the frame of a submodule (a layer compiled on its own after a break) holding indexer code?"""
    if layout is None or not layout.prefix:
        return False
    return layout.holds_indexer_code({full_module_path(n, layout.prefix) for n in gm.graph.nodes})


@contextlib.contextmanager
def fragment_recompiles():
    """Pinned layer frames compile once per layer (and per shape): a deep model would pass Dynamo's
    default recompile limit (8), after which it runs frames uncompiled and unrecorded. Raised for the
    duration only, as the backend raises it (frames.allow_fragment_recompiles) for good."""
    limit = max(torch._dynamo.config.recompile_limit, FRAGMENT_RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        yield


def record_graphs(model: nn.Module, call: Callable[[Callable], object], *, dynamic: bool | None = False,
                  fresh: bool = False) -> GraphRecorder:
    """Compile `model` with a GraphRecorder and run `call(compiled_model)` once, without grad.
    fresh=True clears Dynamo's caches before and after (a capture that must not reuse, or leave behind,
    compiled frames: e.g. inputs marked dynamic)."""
    recorder = GraphRecorder()
    if fresh:
        torch._dynamo.reset()
    try:
        with torch.no_grad(), fragment_recompiles():
            call(torch.compile(model, backend=recorder, dynamic=dynamic))
    finally:
        if fresh:
            torch._dynamo.reset()
    return recorder


def split_inputs(example_inputs, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """(args, kwargs) of a call from example inputs: a dict of keyword inputs, one tensor, or a sequence
    of positional ones; `kwargs` are added to the keywords."""
    kwargs = dict(kwargs or {})
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **kwargs}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    return tuple(example_inputs), kwargs


def capture(model: nn.Module, example_inputs, **kwargs) -> GraphRecorder:
    """Every graph torch.compile would hand a backend for this call (static shapes), with its layout.
    `example_inputs`: a dict of keyword inputs, a tensor, or a tuple of positional inputs; `kwargs` are
    more keyword inputs of the call."""
    args, call_kwargs = split_inputs(example_inputs, kwargs)
    return record_graphs(model, lambda compiled: compiled(*args, **call_kwargs))


def capture_graphs(model: nn.Module, example_inputs, **kwargs) -> list[fx.GraphModule]:
    """The Dynamo FX graph(s) of `capture` alone."""
    return capture(model, example_inputs, **kwargs).graphs


def rewrite_graphs(recorder: GraphRecorder, plan, **options) -> list[RewriteResult]:
    """Every recorded graph rewritten for `plan` as the backend binds it: a graph holding every indexer
    as a whole model, one holding some as a fragment (S layers whose source is elsewhere read the
    index store), one holding none passes through. `options`: more keywords of `rewrite`."""
    return [rewrite(gm, plan, layout=layout, **options) for gm, layout in zip(recorder.graphs, recorder.layouts)]


def indexer_results(results: list[RewriteResult], what: str, hint: str) -> list[RewriteResult]:
    """The rewrites (of `rewrite_graphs`) that hold the model's lightning indexers: one whole-model
    graph, or the fragments that together hold each indexer exactly once.

    Raises PlanError with detection's own message when it was unsure (and found nothing),
    NoIndexerFoundError ("{what}: no lightning indexer found ...; {hint}") when no graph holds an
    indexer, and PlanError when the graphs holding indexers cannot be put together into the model."""
    found = [r for r in results if r.detection.matches]
    if not found:
        uncertain = [r.message for r in results if r.message and not r.detection.confident]
        if uncertain:
            raise PlanError(uncertain[0])
        raise NoIndexerFoundError(f"{what}: no lightning indexer found in the model's {len(results)} "
                                  f"graph(s); {hint}")
    if len(found) == 1 and found[0].fragment is None:
        return found
    unplaced = [r for r in found if r.fragment is None]
    if unplaced:
        raise PlanError(f"{what}: the model was split into {len(results)} graphs with indexers in {len(found)} "
                        f"of them (graph breaks), and {len(unplaced)} of them could not be placed among the "
                        "model's indexer modules (no module path to bind them by); compile with fullgraph=True "
                        "(torch._dynamo.explain(model)(...) lists the breaks)")
    _check_cover(found, what)
    return found


def _check_cover(fragments: list[RewriteResult], what: str) -> None:
    """Each of the model's indexers in exactly one captured fragment, with distinct layer numbers (the
    tools report by layer). A frame Dynamo ran uncompiled would leave its indexers out."""
    positions = sorted(p for r in fragments for p in r.fragment.layers)
    total = len(fragments[0].layout.indexers)
    if positions != list(range(total)):
        missing = sorted(set(range(total)) - set(positions))
        twice = sorted({p for p in positions if positions.count(p) > 1})
        raise PlanError(f"{what}: the model's {total} indexer modules are not each in one captured graph "
                        f"(missing plan positions {missing}, in several graphs {twice}): a frame Dynamo "
                        "ran uncompiled or compiled twice in one call")
    layers = [b.match.layer for r in fragments for b in r.fragment.bindings]
    if len(set(layers)) != len(layers):
        raise PlanError(f"{what}: indexers in different graph fragments share a layer number "
                        f"({sorted(layers)}); their module paths must number the layers")


def source_layers(found: list[RewriteResult]) -> dict[int, int]:
    """Layer number -> its F source's layer number, over the whole model (`found`: of
    `indexer_results`). A store reader is bound to itself within its fragment; its source is the
    plan's, in another fragment."""
    if found[0].fragment is None:
        return {b.match.layer: b.source.layer for b in found[0].bindings}
    layer_at = {p: b.match.layer for r in found for p, b in zip(r.fragment.layers, r.fragment.bindings)}
    sources = found[0].plan.sources()
    return {layer: layer_at[sources[p]] for p, layer in layer_at.items()}


def runnable(result: RewriteResult, store: IndexStore) -> Callable:
    """The rewritten graph as the backend runs it with lowering "eager": a fragment reading or
    writing top-k across graphs goes through `store` (one per plan and model call sequence)."""
    fragment = result.fragment
    if fragment is None or not (fragment.reads or fragment.writes):
        return result.gm.forward
    return with_store(result.gm.forward, store, fragment.reads, fragment.writes)


__all__ = ["GraphRecorder", "capture", "capture_graphs", "fragment_recompiles", "indexer_results", "record_graphs",
           "rewrite_graphs", "runnable", "source_layers", "split_inputs"]
