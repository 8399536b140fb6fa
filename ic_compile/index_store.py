"""The index cache across graph fragments.

When a model compiles into several graphs (graph breaks: MoE dispatch with `.tolist()`, a print
outside the layer stack), an S layer's F source may run in an earlier fragment. The F fragment
returns its top-k as extra outputs and `with_store` writes them here; the S fragment takes them as
extra inputs, read from here, and its own indexer stays deleted.

Freshness without knowing where a model call starts or ends: an F layer's write names the S layers
that will read it (those outside its fragment); each of them may read it exactly once. So every read
is of a top-k written earlier in the same call, and an S fragment running without its F source
having run first (a fragment Dynamo fell back to, a different call order) is an error, never a
stale top-k from an earlier call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import IndexCacheError


class IndexStoreError(IndexCacheError, RuntimeError):
    """An S layer's fragment ran but its F source did not write its top-k first in this call."""


@dataclass
class _Entry:
    tensors: tuple  # (values, indices) of the F layer's topk
    readers: set  # S layers that have not read it yet


class IndexStore:
    """One per compiled model and plan: top-k results keyed by the F layer's plan position."""

    def __init__(self, plan: str):
        self.plan = plan
        self._entries: dict[int, _Entry] = {}

    def write(self, layer: int, tensors: tuple, readers: tuple) -> None:
        self._entries[layer] = _Entry(tuple(tensors), set(readers))

    def read(self, source: int, reader: int) -> tuple:
        entry = self._entries.get(source)
        if entry is None or reader not in entry.readers:
            raise IndexStoreError(
                f"indexcache: S layer {reader} (plan {self.plan}) ran before its F source layer {source} "
                f"wrote its top-k in this call. Layers must run in model order within one call, and every "
                f"graph fragment holding an F layer must run compiled (not a frame Dynamo fell back to). "
                f"If the model's control flow skips layer {source}, give layer {reader} its own indexer (F).")
        entry.readers.discard(reader)
        if not entry.readers:  # every reader has it: drop, so nothing outlives the call
            del self._entries[source]
        return entry.tensors

    def pending(self) -> dict[int, set]:
        """F layers written but not yet read by all their S layers (for tests and messages)."""
        return {layer: set(entry.readers) for layer, entry in self._entries.items()}


_stores: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, IndexStore]]" = weakref.WeakKeyDictionary()


def store_for(model: torch.nn.Module, plan: str) -> IndexStore:
    """The store shared by every fragment of `model` compiled with `plan`."""
    per_plan = _stores.setdefault(model, {})
    return per_plan.setdefault(plan, IndexStore(plan))


def with_store(compiled: Callable, store: IndexStore, reads: list, writes: list, copy: bool = False) -> Callable:
    """Wrap a compiled fragment: append the store reads to its inputs (in `reads` order, the items
    each graph uses), and write the trailing extra outputs (values, indices per F layer) to the store.
    copy=True (CUDA graphs): outputs live in the graph's memory pool, which a later replay may
    overwrite before the S fragment reads them; the store keeps its own copy (B x S x k, small)."""
    extra_outputs = 2 * len(writes)

    def run(*args):
        inputs = [*args, *_read_all(store, reads)]
        outputs = compiled(*inputs)  # Dynamo's convention for what a backend returns: positional args
        if not extra_outputs:
            return outputs
        tail = list(outputs[len(outputs) - extra_outputs:])
        if copy:
            tail = [t.clone() for t in tail]
        for i, write in enumerate(writes):
            store.write(write.layer, tail[2 * i:2 * i + 2], write.readers)
        return type(outputs)(outputs[:len(outputs) - extra_outputs])

    return run


def _read_all(store: IndexStore, reads: list) -> list:
    values = []
    for read in reads:
        tensors = store.read(read.source, read.layer)
        for item, traced in zip(read.items, read.shapes):
            _check_shape(tensors[item], traced, read, store.plan)
            values.append(tensors[item])
    return values


def _check_shape(tensor: torch.Tensor, traced, read, plan: str) -> None:
    """The S graph was compiled for a top-k of the shape it computed itself; its static sizes are
    checked here (a compiled graph would not check an input it has no guard on). Symbolic sizes
    are bound by the graph's other inputs and are not checked."""
    if traced is None:
        return
    static = [(i, size) for i, size in enumerate(traced) if isinstance(size, int)]
    if tensor.dim() != len(traced) or any(tensor.shape[i] != size for i, size in static):
        shown = tuple(size if isinstance(size, int) else "?" for size in traced)
        raise IndexStoreError(
            f"indexcache: S layer {read.layer} selects a top-k of shape {shown} but its F source layer "
            f"{read.source} wrote {tuple(tensor.shape)} (plan {plan}): sharing needs the same k "
            f"and query shape. Give layer {read.layer} its own indexer (F) or use the same index_topk.")
