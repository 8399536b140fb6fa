"""passes/symbolic_sizes.py: sizes rebuilt from a Dynamo graph's own inputs under dynamic shapes."""
import torch
from torch import fx

from ic_compile.passes.graph_ops import example_value
from ic_compile.passes.symbolic_sizes import size_nodes


def dynamo_graph(fn, *inputs) -> fx.GraphModule:
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=capture, dynamic=True)(*inputs)
    return graphs[0]


def graph_inputs(gm: fx.GraphModule, *tensors) -> list:
    """The graph's placeholders filled from `tensors` (in order), SymInt ones with the size they name."""
    tensor_nodes = [p for p in gm.graph.find_nodes(op="placeholder") if isinstance(example_value(p), torch.Tensor)]
    sizes = {str(size): real for node, tensor in zip(tensor_nodes, tensors)
             for size, real in zip(example_value(node).shape, tensor.shape)}
    given = dict(zip(tensor_nodes, tensors))
    return [given[p] if p in given else sizes[str(example_value(p))] for p in gm.graph.find_nodes(op="placeholder")]


def returning_empty_of_shape(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The graph, returning torch.empty of `node`'s (symbolic) shape built by size_nodes instead."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(output):
        sizes = size_nodes(gm.graph, example_value(node).shape)
        if sizes is None:
            return None
        empty = gm.graph.call_function(torch.empty, (sizes,))
    output.args = ((empty,),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_sum_of_a_size_and_a_constant_is_rebuilt_and_follows_the_inputs():
    gm = dynamo_graph(lambda cache, k: torch.cat([cache, k], dim=1) * 2, torch.zeros(2, 5, 3), torch.zeros(2, 1, 3))
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    assert not isinstance(example_value(cat).shape[1], int)  # s + 1: symbolic
    rebuilt = returning_empty_of_shape(gm, cat)
    assert rebuilt is not None and not any(n.target is torch.cat for n in rebuilt.graph.nodes)
    for length in (7, 11):  # other lengths than traced: the sizes come from the inputs at run time
        out = rebuilt(*graph_inputs(rebuilt, torch.zeros(2, length, 3), torch.zeros(2, 1, 3)))
        assert tuple(out[0].shape) == (2, length + 1, 3)


def test_a_size_that_is_not_a_sum_or_product_is_refused():
    gm = dynamo_graph(lambda x: x[:, : x.shape[1] // 2] + 1, torch.zeros(3, 8))
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.add, __import__("operator").add)
               and isinstance(example_value(n), torch.Tensor))
    assert returning_empty_of_shape(gm, add) is None  # floor(s / 2): kept by the caller, not guessed
