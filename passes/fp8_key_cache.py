"""indexer_precision="fp8": each lowered F indexer whose keys live in a buffer cache reads an fp8 copy.

Without this pass the fp8 op quantises all T keys on every call (kernels/fp8_indexer.py): at decode
that is three passes over the key cache per token where the bf16 indexer makes one. Here each
lowered indexer whose key operand is a key-cache buffer (HF StaticCache, a gpt-fast / DeepSeek-style
module buffer) gets the rows the model writes into it this call, `new_keys` [b,n,D] at `new_key_pos`
[n] along dim 1, and the op keeps an e4m3 copy of the buffer, quantising only those rows
(kernels/fp8_key_cache.py). The model's own write stays: its cache is unchanged.

Recognised writes (one per buffer, into the buffer or a batch prefix `buf[:b]` of it):
    buf.index_copy_(1, positions, new_keys)
    buf[:b, positions] = new_keys          (positions: an int tensor)
    buf[:b, start:stop] = new_keys         (positions = arange(start, stop))
and the indexer reading the buffer or a `[:B, :T]` view of it; neither the written keys nor their
positions may change in place after the write (the op reads them later). Anything else keeps per-call
quantisation (the same answer), with the reason in `LoweringReport.fp8_key_cache_skipped`; a decode
graph left so warns once (its steps then cost more than bf16 ones at long context).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import fx

from ic_compile.kernels.fp8_indexer import FP8_DTYPE

from .graph_ops import (CONSTRUCTORS, LAYOUT_OPS, arg_of, example_value, is_parameter, op_name, shape_of,
                        tensor_args, writers_of, writes_in_place)
from .lower_indexer import IndexerPrecisionWarning, decode_sized, lowered_indexer, query_count

if TYPE_CHECKING:
    from .manager import PassContext

VIEW_OPS = {"getitem", "view", "squeeze", "unsqueeze", "narrow"}  # no copy: the op's keys stay the buffer's


def fp8_key_cache(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: fp8 lowered indexers reading a recognised key-cache buffer get that call's new keys."""
    requantised = []
    for node in gm.graph.find_nodes(op="call_function", target=lowered_indexer):
        if node.kwargs.get("indexer_precision") != "fp8":
            continue
        layer = node.meta.get("indexcache_layer")
        if "k_layout" in node.kwargs:  # the copy is kept per [B,T,D] cache row
            write = f"its keys are laid out '{node.kwargs['k_layout']}', not [B,T,D]"
        elif "key_scale" in node.kwargs:  # the model's own scale cache beside the key cache
            keys = example_value(node.args[1])
            if isinstance(keys, torch.Tensor) and keys.dtype == FP8_DTYPE:  # the op reads them as they are
                ctx.report.fp8_key_cache_skipped[layer] = "the model keeps its keys in fp8 itself"
                continue
            write = "its keys carry a per-key scale of the model's own (a scale cache beside the key cache)"
        else:
            write = key_cache_write(node.args[1])
        if isinstance(write, str):
            ctx.report.fp8_key_cache_skipped[layer] = write
            ctx.counters["fp8_key_cache.skipped"] += 1
            if decode_sized(query_count(node)):
                requantised.append((layer, write))
            continue
        new_keys, positions = write
        with gm.graph.inserting_before(node):
            positions = positions(gm.graph) if callable(positions) else positions
        node.kwargs = {**node.kwargs, "new_keys": new_keys, "new_key_pos": positions}
        ctx.report.fp8_key_cache.append(layer)
        ctx.counters["fp8_key_cache.mirrored"] += 1
    if requantised:
        warnings.warn(
            "indexer_precision='fp8': in this decode graph the indexers of layers "
            f"{[layer for layer, _ in requantised]} quantise their whole key cache to fp8 on every step ("
            f"{requantised[0][1]}), which at long context costs more than the bf16 indexer. Decode with a "
            "StaticCache (ic_compile.static_cache) to keep an fp8 key cache instead.", IndexerPrecisionWarning,
            stacklevel=2)
    return gm


def key_cache_write(keys: fx.Node):
    """(new_keys node, positions node | a function adding it to a graph) of the one write into the
    buffer behind `keys`, or why there is none that the fp8 key cache can follow."""
    buffer, chain = _buffer_behind(keys)
    if buffer is None:
        return chain
    value = example_value(keys)
    if isinstance(value, torch.Tensor) and not _prefix_view(value):
        return f"the indexer reads {'/'.join(chain)} of its key buffer, not a [:B, :T] view"
    writers = writers_of(buffer)
    if len(writers) != 1:
        return f"its key buffer {buffer.name} has {len(writers)} in-place writes, not one"
    write = _parse_write(writers[0], buffer)
    if isinstance(write, str):
        return f"{writers[0].name}: {write}"
    new_value = example_value(write[0])
    if not isinstance(new_value, torch.Tensor) or new_value.dim() != 3 or not new_value.is_floating_point() \
            or new_value.element_size() == 1:
        return f"{writers[0].name}: the written keys are not [b,n,D] in a float dtype wider than 8 bits"
    changed = [n.name for n in write if isinstance(n, fx.Node) and _written_after(n, writers[0])]
    if changed:  # the op, after the write, would read other keys or positions than were written
        return f"{writers[0].name}: {changed[0]} is changed in place after the write"
    return write


def _written_after(node: fx.Node, write: fx.Node) -> bool:
    """Is the tensor `node` (or the one it is a view of) written in place after `write`?"""
    while op_name(node) in VIEW_OPS and tensor_args(node):
        node = tensor_args(node)[0]
    order = {n: i for i, n in enumerate(write.graph.nodes)}
    return any(order[w] > order[write] for w in writers_of(node))


def _buffer_behind(keys: fx.Node):
    """(the buffer the keys are a view of, the view ops on the way) or (None, why). The buffer: a graph
    input or attribute, or a tensor made in this call (a cache's lazy allocation on its first write,
    handed out of the graph as the cache's state)."""
    node, chain = keys, []
    for _ in range(16):
        name = op_name(node)
        if node.op in ("placeholder", "get_attr") or name in CONSTRUCTORS:
            if is_parameter(node):
                return None, "its keys are a parameter"
            return node, chain
        if name == "cat":
            return None, "its keys grow by concatenation (a DynamicCache or an attribute cache)"
        if writes_in_place(node) and tensor_args(node):  # k = cache.index_copy_(...): the cache itself
            node = tensor_args(node)[0]
            continue
        if name in LAYOUT_OPS and tensor_args(node):
            if name not in VIEW_OPS:
                return None, f"its keys reach it through {name}, which may copy them"
            chain.append(name)
            node = tensor_args(node)[0]
            continue
        break
    return None, "its keys are computed in this call (no key cache)"


def _prefix_view(value: torch.Tensor) -> bool:
    """[B,T,D] with rows of D contiguous from the storage's start (what kernels/fp8_key_cache.py mirrors)."""
    try:
        return value.dim() == 3 and value.storage_offset() == 0 and value.stride(2) == 1 \
            and value.stride(1) == value.shape[2]
    except RuntimeError:  # a fake tensor without strides: left to the op's own check
        return True


def _parse_write(writer: fx.Node, buffer: fx.Node):
    """(new_keys, positions) of index_copy_(1, pos, new) / [:b, pos] = new / [:b, s:e] = new, or why not."""
    target = writer.args[0]
    if target is not buffer and not _batch_prefix(target, buffer):
        return "writes a view of the buffer other than a batch prefix buf[:b]"
    name = op_name(writer)
    if name == "index_copy_":
        dim, positions, new = arg_of(writer, 1, "dim"), arg_of(writer, 2, "index"), arg_of(writer, 3, "source")
        if dim not in (1, -2) or not isinstance(positions, fx.Node) or not isinstance(new, fx.Node):
            return f"index_copy_ along dim {dim}, not 1"
        return new, positions
    if name == "setitem" and len(writer.args) == 3 and isinstance(writer.args[2], fx.Node):
        index, new = writer.args[1], writer.args[2]
        if not (isinstance(index, tuple) and len(index) == 2 and _from_start(index[0])):
            return f"writes buf[{index}], not buf[:b, positions]"
        if _broadcast_over_batch(new, index[0], buffer):
            return "writes one row of keys to every sequence of the batch"
        rows = index[1]
        if isinstance(rows, fx.Node) and (v := example_value(rows)) is not None and v.dim() == 1 \
                and not v.is_floating_point() and v.dtype != torch.bool:
            return new, rows
        if isinstance(rows, slice) and rows.step is None and rows.stop is not None:
            return new, _arange(rows.start or 0, rows.stop, example_value(new).device)
        return f"writes buf[:, {rows}], not positions or a start:stop range"
    return f"{name} is not a write this pass follows"


def _broadcast_over_batch(new: fx.Node, rows: slice, buffer: fx.Node) -> bool:
    """new [1,n,D] assigned to buf[:b] with b possibly > 1 (the copy would get row 0 only)."""
    value = example_value(new)
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[0] != 1:
        return False
    batch = rows.stop if rows.stop is not None else (shape_of(buffer) or (None,))[0]
    return batch != 1


def _batch_prefix(view: fx.Node, buffer: fx.Node) -> bool:
    """view = buffer[:b] (or buffer[0:b], buffer[:b, :])."""
    if op_name(view) != "getitem" or view.args[0] is not buffer:
        return False
    index = view.args[1] if isinstance(view.args[1], tuple) else (view.args[1],)
    return bool(index) and _from_start(index[0]) and all(i == slice(None) for i in index[1:])


def _from_start(index) -> bool:
    return isinstance(index, slice) and index.start in (None, 0) and index.step is None


def _arange(start, stop, device):
    def add(graph: fx.Graph) -> fx.Node:
        return graph.call_function(torch.arange, (start, stop), {"device": device, "dtype": torch.long})
    return add
