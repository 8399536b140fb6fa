"""The eager meaning of a plan for models without native IndexCache support: forward hooks.

    with shared_indexer_hooks(model, "FSSF"):
        logits = model(ids).logits      # each S indexer's output replaced by the last F output

This is the oracle the compiled model is tested against (and a way to try a plan without compiling).
The S indexers still run here; only their outputs are replaced.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .plan import LayerPlan, check_plan_length


def find_indexer_modules(model: nn.Module) -> list[nn.Module]:
    """Modules named `indexer` or whose class name ends in 'Indexer', in model order."""
    return [m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] == "indexer" or type(m).__name__.endswith("Indexer")]


@contextlib.contextmanager
def shared_indexer_hooks(model: nn.Module, plan, indexers: list[nn.Module] | None = None):
    indexers = find_indexer_modules(model) if indexers is None else indexers
    plan = LayerPlan.coerce(plan, len(indexers))
    check_plan_length(plan, len(indexers))
    last_full = {}

    def keep(_module, _inputs, output):
        last_full["indices"] = output

    def reuse(_module, _inputs, _output):
        return last_full["indices"]

    handles = [m.register_forward_hook(keep if role == "F" else reuse)
               for m, role in zip(indexers, plan.pattern)]
    try:
        yield plan
    finally:
        for handle in handles:
            handle.remove()
