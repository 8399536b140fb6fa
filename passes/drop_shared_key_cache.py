"""S layers stop writing their indexer caches: nobody reads them once their indexer is gone.

Run after `forward_indices` + dead-code elimination. What an S indexer stores for later calls:
- growing caches (HF DynamicCache): `keys = cat([old_keys, new_key])` whose only remaining user is
  the graph output (the cache's new state), `old_keys` empty -> the output gets `old_keys` back, so
  the S layer's indexer cache stays empty (as in HF's native plan) and its key projection, norm and
  rope die. With keys in `old_keys` (a model that never saw an empty one) the cat is state, below;
- buffers (gpt-fast / DeepSeek inference style, module buffers or attributes that are graph inputs):
  every in-place write made inside the S indexer (`index_copy_`, `cache[:b, s:e] = k`, the per-key
  scale cache next to the key cache) into a buffer that nothing else reads any more -> erased. A
  buffer written also outside the indexer (the attention's KV cache) is never touched;
- state handed out of the graph (a module attribute set on the first call, `self.k_cache = k`, or
  HF DeepSeek-V4's compressor buffers): an output computed inside the S indexer and read by nothing
  else in the graph -> an uninitialised tensor of the same shape and dtype, so the attribute keeps
  its shape (code that reads its length behaves the same) and only its contents, which only the
  S indexer reads, go stale.
Anything else is left alone (and still costs the key computation + write; see `CacheWrite.dropped`).
The premise, IndexCache's: an S layer's indexer state is read by that indexer only, in every graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx

from .eliminate_dead_code import remove_dead_code
from .graph_ops import (CONSTRUCTORS, LAYOUT_OPS, example_value, is_parameter, module_path, op_name, tensor_args,
                        views_of, writers_of, writes_in_place)
from .symbolic_sizes import size_nodes

if TYPE_CHECKING:
    from .bind_plan import LayerBinding
    from .manager import PassContext

@dataclass
class CacheWrite:
    layer: int
    concat: fx.Node | None = None  # growing cache: the cat node
    old_keys: fx.Node | None = None  # its input that holds the previous keys
    buffer: fx.Node | None = None  # static cache: the buffer written in place
    writers: list = field(default_factory=list)  # in-place write nodes on `buffer`
    buffers: list = field(default_factory=list)  # other (buffer, writers) the S indexer writes (scale caches)
    states: list = field(default_factory=list)  # S-indexer tensors that leave the graph (attribute state)
    dropped: bool = False  # every write above was removed
    kept: list = field(default_factory=list)  # what could not be removed, and why


def find_shared_key_caches(bindings: list[LayerBinding]) -> list[CacheWrite]:
    """Call before any rewrite (bind_plan does): records where each S layer's indexer stores state across calls."""
    found = [_find_all(b.match) for b in bindings if b.role == "S"]
    return [cache for cache in found if cache is not None]


def _find_all(match) -> CacheWrite | None:
    cache = (_find(match.key, match.layer) if match.key is not None else None) or CacheWrite(match.layer)
    # the topk's own module path: relative to the frame (match.module has the frame's prefix in front)
    scope, graph = module_path(match.topk), match.topk.graph
    written = [(b, w) for b, w in _buffers_written_in(graph, scope) if b is not cache.buffer]
    cache.buffers = written
    cache.states = [n for n in _outputs_from(graph, scope) if n is not cache.concat]
    if cache.concat is None and cache.buffer is None and not written and not cache.states:
        return None
    return cache


def _find(key: fx.Node, layer: int) -> CacheWrite | None:
    """None when the key is computed fresh each call (no cache)."""
    node = key
    for _ in range(16):
        name = op_name(node)
        if name == "cat":
            return _from_concat(node, layer)
        if node.op in ("placeholder", "get_attr"):
            return CacheWrite(layer, buffer=node, writers=writers_of(node))
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


def _in_scope(node: fx.Node, scope: str) -> bool:
    path = module_path(node)
    return bool(scope) and (path == scope or path.startswith(scope + "."))


def _buffers_written_in(graph: fx.Graph, scope: str) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Graph inputs (not parameters) written in place, every write made inside the module `scope`."""
    found = []
    for node in graph.nodes:
        if node.op not in ("placeholder", "get_attr") or is_parameter(node):
            continue
        writers = writers_of(node)
        if writers and all(_in_scope(w, scope) for w in writers):
            found.append((node, writers))
    return found


def _outputs_from(graph: fx.Graph, scope: str) -> list[fx.Node]:
    """Tensors computed inside `scope` that the graph returns (state Dynamo stores back after it)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = dict.fromkeys(n for n in tensor_args(output)
                           if n.op in ("call_function", "call_method") and _in_scope(n, scope))
    return list(values)


def drop_shared_key_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: drops what it can of each of ctx.caches (found by bind_plan), recording on each
    cache whether every write went (`dropped`) and why any stayed (`kept`)."""
    live = set(gm.graph.nodes)
    for cache in ctx.caches:
        done, states = [], list(cache.states)
        if cache.concat is not None and cache.old_keys is not None:
            concat = _drop_concat(cache, live)
            if concat is None:
                states.append(cache.concat)
            else:
                done.append(concat)
        if cache.buffer is not None:
            done.append(_drop_buffer(gm.graph, cache.buffer, cache.writers, live, cache))
            remove_dead_code(gm.graph)  # the key writes' positions may have been a length counter's last reader
            live = set(gm.graph.nodes)
        done += [_drop_buffer(gm.graph, b, w, live, cache) for b, w in cache.buffers]
        remove_dead_code(gm.graph)  # the state below may have been read by the writes just erased
        live = set(gm.graph.nodes)
        done += [_drop_state(gm.graph, node, live, cache) for node in states]
        cache.dropped = bool(done) and all(done)
        ctx.counters["drop_shared_key_cache.dropped" if cache.dropped else "drop_shared_key_cache.kept"] += 1
    remove_dead_code(gm.graph)
    return gm


def _drop_concat(cache: CacheWrite, live: set) -> bool | None:
    if cache.concat not in live:
        return True  # already gone with the S indexer
    if not all(u.op == "output" for u in cache.concat.users):
        cache.kept.append(f"{cache.concat.name}: the appended keys are read outside the graph output")
        return False
    if not _is_empty(cache.old_keys):
        return None  # a length the model may read (self.k_cache.shape[1]): handled as state, length kept
    cache.concat.replace_all_uses_with(cache.old_keys)
    if cache.old_keys.op != "placeholder" and not _hand_out_empty(cache.old_keys.graph, cache.old_keys):
        # HF's torch.tensor([]).to(...) made inside the S indexer, of a shape we cannot rebuild
        cache.kept.append(f"{cache.old_keys.name}: the empty cache's symbolic shape is not rebuilt")
        return False
    return True


def _is_empty(node: fx.Node) -> bool:
    """Holds no keys: HF's lazily initialised cache, and an S layer's after we kept it that way."""
    value = example_value(node)
    return isinstance(value, torch.Tensor) and any(isinstance(size, int) and size == 0 for size in value.shape)


def _drop_buffer(graph: fx.Graph, buffer: fx.Node, writers: list, live: set, cache: CacheWrite) -> bool:
    writers = [w for w in writers if w in live]
    views = views_of(buffer)
    readers = {u for v in views for u in v.users} - set(views) - set(writers)
    if readers or any(w.users for w in writers):
        cache.kept.append(f"{buffer.name}: still read by {sorted(n.name for n in readers)[:3]}")
        return False
    for writer in writers:
        graph.erase_node(writer)
    return True


def _drop_state(graph: fx.Graph, node: fx.Node, live: set, cache: CacheWrite) -> bool:
    """The output gets an uninitialised tensor of the same shape, dtype and device instead."""
    if node not in live:
        return True
    value = example_value(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if set(node.users) != {output} or not isinstance(value, torch.Tensor):
        cache.kept.append(f"{node.name}: read inside the graph too")
        return False
    if not _hand_out_empty(graph, node):
        cache.kept.append(f"{node.name}: symbolic shape {tuple(value.shape)} not a sum or product of the "
                          "graph's size symbols (dynamic shapes)")
        return False
    return True


def _hand_out_empty(graph: fx.Graph, node: fx.Node) -> bool:
    """The graph output `node` becomes torch.empty of its shape, dtype and device, made outside any
    module: the S indexer's ops that computed it die. A symbolic shape (dynamic shapes: an attribute
    cache one token longer each step) is rebuilt from the graph's inputs; False when it cannot be."""
    value = example_value(node)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(output):
        sizes = size_nodes(graph, value.shape)
        if sizes is None:
            return False
        empty = graph.call_function(torch.empty, (tuple(sizes),), {"dtype": value.dtype, "device": value.device})
    empty.meta["example_value"] = value
    output.replace_input_with(node, empty)
    return True
