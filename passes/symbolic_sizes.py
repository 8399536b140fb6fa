"""Graph nodes that compute a tensor's sizes under dynamic shapes, from the graph's own inputs.

Dynamo gives every dynamic size a symbol (`s15`) and the graph the means to read it: a SymInt
placeholder, or a dimension of an input tensor. A size such as `s15 + 1` (a key cache one token
longer than last step's) is then rebuilt as `x.size(1) + 1` inside the graph. A pass that replaces a
tensor by a fresh one of the same shape (torch.empty) needs these nodes when the shape is symbolic.

Only sums and products of symbols and integers are rebuilt; anything else (Min, floor division) makes
`size_nodes` return None, and the caller keeps the original computation and says so.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .graph_ops import example_value


def size_nodes(graph: fx.Graph, shape: torch.Size) -> list | None:
    """[int | fx.Node] that equal `shape` at run time, inserted at the graph's current insertion
    point; None when some size is not a sum/product of symbols the graph's inputs carry."""
    sources = _symbol_sources(graph)
    sizes = []
    for size in shape:
        if isinstance(size, int):
            sizes.append(size)
            continue
        built = _build(graph, size.node.expr, sources)
        if built is None:
            return None
        sizes.append(built)
    return sizes


def _symbol_sources(graph: fx.Graph) -> dict:
    """{sympy symbol: (placeholder, dim or None)}: a SymInt placeholder (dim None) or a tensor
    placeholder's dimension whose size is exactly that symbol."""
    sources = {}
    for node in graph.find_nodes(op="placeholder"):
        value = example_value(node)
        if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
            sources.setdefault(value.node.expr, (node, None))
        elif isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sources.setdefault(size.node.expr, (node, dim))
    return sources


def _build(graph: fx.Graph, expr, sources: dict):
    """An fx node (or int) computing the sympy expression `expr`, or None."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr not in sources:
            return None
        node, dim = sources[expr]
        if dim is None:
            return node
        size = graph.call_method("size", (node, dim))
        size.meta["example_value"] = example_value(node).shape[dim]
        return size
    combine = {"Add": operator.add, "Mul": operator.mul}.get(type(expr).__name__)
    if combine is None:
        return None
    terms = [_build(graph, arg, sources) for arg in expr.args]
    if any(term is None for term in terms):
        return None
    result = terms[0]
    for term in terms[1:]:
        value = combine(_value(result), _value(term))
        result = graph.call_function(combine, (result, term))
        result.meta["example_value"] = value
    return result


def _value(term):
    return example_value(term) if isinstance(term, fx.Node) else term
