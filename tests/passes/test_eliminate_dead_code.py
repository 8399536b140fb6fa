"""DCE keeps in-place writes into buffers that outlive the graph, drops writes nobody can read."""

import torch
from torch import fx

from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.graph_ops import op_name
from ic_compile.passes.manager import PassContext


def dce(fn, ctx=None) -> fx.GraphModule:
    gm = eliminate_dead_code(fx.symbolic_trace(fn), ctx or PassContext())
    gm.recompile()
    return gm


def ops(fn) -> list[str]:
    return [op_name(n) for n in dce(fn).graph.nodes if op_name(n)]


def unread_local_buffer(x, cache):
    buffer = x.new_empty(2, 4)
    buffer[:, :2].copy_(x)
    buffer[:, 2:].copy_(x * 2)
    return x + 1


def read_local_buffer(x, cache):
    buffer = x.new_empty(2, 4)
    buffer[:, :2].copy_(x)
    buffer[:, 2:].copy_(x * 2)
    return buffer.sum()


def write_into_input(x, cache):
    cache[:, :2].copy_(x)
    return x + 1


def test_writes_into_an_unread_local_buffer_are_dead():
    assert ops(unread_local_buffer) == ["add"]


def test_a_read_local_buffer_keeps_its_writes():
    assert ops(read_local_buffer).count("copy_") == 2


def test_writes_into_an_input_buffer_are_kept():
    assert "copy_" in ops(write_into_input)
    cache = torch.zeros(2, 4)
    dce(write_into_input)(torch.ones(2, 2), cache)
    assert cache[:, :2].eq(1).all()


def dead_triu_mask(x, cache):
    mask = x.new_full((2, 2), float("-inf")).triu_(1)  # its reader is gone: nothing sees the write
    mask += 1
    return x + 1


def read_triu_mask(x, cache):
    return x + x.new_full((2, 2), float("-inf")).triu_(1)


def fresh_buffer_copied_into_the_cache(x, cache):
    buffer = x.new_zeros(2, 2)
    buffer.fill_(3)
    cache[:, :2].copy_(buffer)  # the cache reads the temporary: its writes stay
    return x + 1


def test_in_place_ops_on_an_unread_temporary_are_dead():
    assert ops(dead_triu_mask) == ["add"]


def test_a_read_temporary_keeps_its_in_place_ops():
    assert ops(read_triu_mask) == ["new_full", "triu_", "add"]


def test_a_temporary_written_into_a_cache_keeps_its_writes():
    assert ops(fresh_buffer_copied_into_the_cache).count("fill_") == 1
    cache = torch.zeros(2, 4)
    dce(fresh_buffer_copied_into_the_cache)(torch.ones(2, 2), cache)
    assert cache[:, :2].eq(3).all()


def test_counts_the_dead_temporaries_it_erases():
    """One count per temporary (with its views and in-place ops), not per node; none when read."""
    ctx = PassContext()
    dce(dead_triu_mask, ctx)
    dce(unread_local_buffer, ctx)
    dce(read_triu_mask, ctx)
    assert ctx.counters["eliminate_dead_code.dead_temporaries"] == 2
