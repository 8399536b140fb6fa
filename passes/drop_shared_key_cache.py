"""S layers stop writing their indexer key cache: nobody reads it once their indexer is gone.

Run after `forward_indices` + dead-code elimination. Two cache styles are handled:
- growing caches (HF DynamicCache): `keys = cat([old_keys, new_key])` whose only remaining user is
  the graph output (the cache's new state) -> the output gets `old_keys` back, so the S layer's
  indexer cache stays as it was (empty after prefill) and its key projection, norm and rope die;
- static caches (gpt-fast style buffers): in-place writes (`index_copy_`, `cache[...] = k`) into a
  buffer that nothing else reads any more -> the writes are erased.
Anything else is left alone (and still costs the key computation + write; see `CacheWrite.kept`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from .bind_plan import LayerBinding
from .eliminate_dead_code import eliminate_dead_code
from .graph_ops import LAYOUT_OPS, op_name, tensor_args, writes_in_place

CONSTRUCTORS = {"tensor", "empty", "zeros", "new_empty", "new_zeros", "empty_like", "zeros_like"}


@dataclass
class CacheWrite:
    layer: int
    concat: fx.Node | None = None  # growing cache: the cat node
    old_keys: fx.Node | None = None  # its input that holds the previous keys
    buffer: fx.Node | None = None  # static cache: the buffer written in place
    writers: list = field(default_factory=list)  # in-place write nodes on `buffer`
    dropped: bool = False


def find_shared_key_caches(bindings: list[LayerBinding]) -> list[CacheWrite]:
    """Call before any rewrite: records where each S layer's indexer keys are cached."""
    found = [_find(b.match.key, b.match.layer) for b in bindings if b.role == "S" and b.match.key is not None]
    return [cache for cache in found if cache is not None]


def _find(key: fx.Node, layer: int) -> CacheWrite | None:
    """None when the key is computed fresh each call (no cache)."""
    node = key
    for _ in range(16):
        name = op_name(node)
        if name == "cat":
            return _from_concat(node, layer)
        if node.op in ("placeholder", "get_attr"):
            return CacheWrite(layer, buffer=node, writers=_writers_of(node))
        if name in LAYOUT_OPS and tensor_args(node):
            node = tensor_args(node)[0]
            continue
        if writes_in_place(node):  # k = cache.index_copy_(...)
            node = tensor_args(node)[0]
            continue
        break
    return None


def _from_concat(concat: fx.Node, layer: int) -> CacheWrite | None:
    """cat([old_keys, new_key]) is a cache append; a cat of two computed parts (rope) is not."""
    inputs = tensor_args(concat)
    old = [n for n in inputs if n.op == "placeholder" or op_name(n) in CONSTRUCTORS]
    if len(inputs) != 2 or len(old) != 1:
        return None
    return CacheWrite(layer, concat=concat, old_keys=old[0])


def _views_of(buffer: fx.Node) -> list[fx.Node]:
    """The buffer and every view of it (cache[:B], .view(...)) through layout ops."""
    views, frontier = [buffer], [buffer]
    while frontier:
        frontier = [u for n in frontier for u in n.users if op_name(u) in LAYOUT_OPS and u.args[0] is n]
        views += frontier
    return views


def _writers_of(buffer: fx.Node) -> list[fx.Node]:
    return [u for view in _views_of(buffer) for u in view.users
            if writes_in_place(u) and u.args and u.args[0] is view]


def drop_shared_key_cache(gm: fx.GraphModule, caches: list[CacheWrite]) -> fx.GraphModule:
    live = set(gm.graph.nodes)
    for cache in caches:
        if cache.concat is not None and cache.concat in live and cache.old_keys is not None:
            if all(u.op == "output" for u in cache.concat.users):
                cache.concat.replace_all_uses_with(cache.old_keys)
                cache.dropped = True
        elif cache.buffer is not None and cache.writers and all(w in live for w in cache.writers):
            views = _views_of(cache.buffer)
            readers = {u for v in views for u in v.users} - set(views) - set(cache.writers)
            if not readers and not any(w.users for w in cache.writers):
                for writer in cache.writers:
                    gm.graph.erase_node(writer)
                cache.dropped = True
    return eliminate_dead_code(gm)
