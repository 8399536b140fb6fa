"""Graph capture: the Dynamo FX graph(s) torch.compile hands a backend, and the check that one of them
holds every lightning indexer. One implementation for the tools (explain, graph diff, search) and the
exporters; the `indexcache` backend itself receives its graphs from torch.compile directly.

    graphs = capture_graphs(model, {"input_ids": ids, "use_cache": False})   # [fx.GraphModule, ...]
    result = indexer_graph([rewrite(gm, plan) for gm in graphs], "explain", "nothing to share")

`GraphRecorder` is the recording backend; `record_graphs` runs a model once under it (no grad), also
keeping the real inputs Dynamo passed with each graph (parameters, buffers, user tensors, sizes).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from .plan import PlanError
from .rewrite import NoIndexerFoundError, RewriteResult


class GraphRecorder:
    """A torch.compile backend that keeps every graph Dynamo hands it, with its example inputs.

    Each compiled graph runs as `gm.forward`, or, given `runner`, as `runner(slot)` looked up at every
    call (slot: the graph's index in `graphs`), so a caller can swap what runs without recompiling."""

    def __init__(self, runner: Callable[[int], Callable] | None = None):
        self.graphs: list[fx.GraphModule] = []
        self.inputs: list[list] = []  # per graph: what Dynamo passed (parameters, buffers, tensors, sizes)
        self.runner = runner

    def __call__(self, gm: fx.GraphModule, example_inputs, **_options):
        slot = len(self.graphs)
        self.graphs.append(gm)
        self.inputs.append(list(example_inputs))
        if self.runner is None:
            return gm.forward

        def run(*args):
            return self.runner(slot)(*args)
        return run


def record_graphs(model: nn.Module, call: Callable[[Callable], object], *, dynamic: bool | None = False,
                  fresh: bool = False) -> GraphRecorder:
    """Compile `model` with a GraphRecorder and run `call(compiled_model)` once, without grad.
    fresh=True clears Dynamo's caches before and after (a capture that must not reuse, or leave behind,
    compiled frames: e.g. inputs marked dynamic)."""
    recorder = GraphRecorder()
    if fresh:
        torch._dynamo.reset()
    try:
        with torch.no_grad():
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


def capture_graphs(model: nn.Module, example_inputs, **kwargs) -> list[fx.GraphModule]:
    """The Dynamo FX graph(s) torch.compile would hand a backend for this call (static shapes).
    `example_inputs`: a dict of keyword inputs, a tensor, or a tuple of positional inputs; `kwargs` are
    more keyword inputs of the call."""
    args, call_kwargs = split_inputs(example_inputs, kwargs)
    return record_graphs(model, lambda compiled: compiled(*args, **call_kwargs)).graphs


def indexer_graph(results: list[RewriteResult], what: str, hint: str) -> RewriteResult:
    """The rewrite of the one captured graph that holds the model's lightning indexers.

    `results`: `rewrite(gm, plan)` of every captured graph. Raises PlanError with detection's own message
    when it was unsure (and found nothing), NoIndexerFoundError ("{what}: no lightning indexer found ...;
    {hint}") when no graph holds an indexer, and PlanError when graph breaks spread the indexers over
    several graphs (the tools count and rewrite one graph; the backend itself handles such splits)."""
    found = [r for r in results if r.detection.matches]
    if not found:
        uncertain = [r.message for r in results if r.message and not r.detection.confident]
        if uncertain:
            raise PlanError(uncertain[0])
        raise NoIndexerFoundError(f"{what}: no lightning indexer found in the model's {len(results)} "
                                  f"graph(s); {hint}")
    if len(found) > 1:
        raise PlanError(f"{what}: the model was split into {len(results)} graphs with indexers in {len(found)} "
                        f"of them (graph breaks); {what} needs every indexer layer in one graph "
                        "(torch._dynamo.explain(model)(...) lists the breaks)")
    return found[0]


__all__ = ["GraphRecorder", "capture_graphs", "indexer_graph", "record_graphs", "split_inputs"]
