"""DCE keeps in-place writes into buffers that outlive the graph, drops writes nobody can read."""

import torch
from torch import fx

from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.graph_ops import op_name


def ops(fn) -> list[str]:
    return [op_name(n) for n in eliminate_dead_code(fx.symbolic_trace(fn)).graph.nodes if op_name(n)]


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
    eliminate_dead_code(fx.symbolic_trace(write_into_input))(torch.ones(2, 2), cache)
    assert cache[:, :2].eq(1).all()
