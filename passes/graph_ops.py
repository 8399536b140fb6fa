"""Helpers shared by the passes: what a Dynamo FX node does, independent of how the user wrote it.

Dynamo graphs hold torch functions (`torch.matmul`), Python operators (`operator.matmul`, `@`),
Tensor methods (`x.matmul`) and functionals (`F.relu`). `op_name` maps all of them to one name.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

_OPERATOR_NAMES = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.matmul: "matmul", operator.neg: "neg", operator.getitem: "getitem",
    operator.invert: "invert", operator.and_: "and", operator.or_: "or", operator.setitem: "setitem",
}
_ALIASES = {"truediv": "div", "true_divide": "div", "multiply": "mul", "subtract": "sub",
            "clip": "clamp", "clip_min": "clamp_min", "__matmul__": "matmul", "relu_": "relu"}

# ops that change only layout / dtype: a score tensor passes through them unchanged
LAYOUT_OPS = {"view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "contiguous", "to",
              "float", "half", "bfloat16", "double", "long", "int", "type", "type_as", "clone", "expand",
              "expand_as", "flatten", "unflatten", "getitem", "narrow", "movedim", "swapaxes"}
# elementwise ops a mask or a scale enters through
MASK_SCALE_OPS = {"add", "sub", "mul", "div", "masked_fill", "where", "neg"}
PRODUCT_OPS = {"matmul", "bmm", "einsum", "mm"}
REDUCE_OPS = {"sum"}
CONSTRUCTORS = {"tensor", "empty", "zeros", "new_empty", "new_zeros", "empty_like", "zeros_like"}  # fresh tensors
IN_PLACE_WRITES = {"index_copy_", "index_put_", "copy_", "setitem", "scatter_", "masked_scatter_",
                   "index_add_", "fill_", "zero_"}


def op_name(node: fx.Node) -> str:
    """'matmul', 'relu', 'topk', ... for call_function / call_method nodes, '' otherwise."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = _OPERATOR_NAMES.get(node.target) or getattr(node.target, "__name__", str(node.target))
    else:
        return ""
    return _ALIASES.get(name, name)


def writes_in_place(node: fx.Node) -> bool:
    """Does the op write into its first argument (copy_, index_put_, x[i] = y, any `op_` method)?"""
    name = op_name(node)
    return name in IN_PLACE_WRITES or (name.endswith("_") and not name.startswith("_"))


def views_of(buffer: fx.Node) -> list[fx.Node]:
    """The buffer and every view of it (cache[:B], .view(...)) through layout ops."""
    views, frontier = [buffer], [buffer]
    while frontier:
        frontier = [u for n in frontier for u in n.users if op_name(u) in LAYOUT_OPS and u.args[0] is n]
        views += frontier
    return views


def writers_of(buffer: fx.Node) -> list[fx.Node]:
    """The in-place writes (index_copy_, cache[i] = x, ...) into the buffer or any view of it."""
    return [u for view in views_of(buffer) for u in view.users
            if writes_in_place(u) and u.args and u.args[0] is view]


def is_relu(node: fx.Node) -> bool:
    """relu(x), clamp_min(x, 0), clamp(x, min=0), clamp(x, 0)."""
    name = op_name(node)
    if name == "relu":
        return True
    if name == "clamp_min":
        return arg_of(node, 1, "min") == 0
    if name == "clamp":
        return arg_of(node, 1, "min") == 0 and arg_of(node, 2, "max") is None
    return False


def arg_of(node: fx.Node, pos: int, name: str):
    """The call's argument at position `pos`, or given by keyword `name`."""
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The fx.Node inputs of a node, in order (flattening lists such as cat's)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return found


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def is_real_tensor(value) -> bool:
    """A tensor with data (an example input's real value), not a FakeTensor."""
    return isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor)


def subgraph_module(inputs: list[fx.Node], nodes: list[fx.Node], outputs) -> fx.GraphModule:
    """`nodes` (graph order) alone as a module: one placeholder per node of `inputs`, returning
    `outputs` (a node or a tuple of nodes). Raises KeyError when a node reads a node from outside
    that is not one of `inputs`."""
    graph = fx.Graph()
    env = {node: graph.placeholder(f"in_{i}") for i, node in enumerate(inputs)}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    graph.output(fx.node.map_arg(outputs, lambda node: env[node]))
    return fx.GraphModule(torch.nn.Module(), graph)


def shape_of(node: fx.Node) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_last_dim(dim, node: fx.Node) -> bool:
    """Is `dim` (an op's dim argument) the last dim of `node`'s tensor? (-1, or rank - 1 when known)"""
    shape = shape_of(node)
    return dim == -1 or (shape is not None and dim == len(shape) - 1)


def is_parameter(node: fx.Node) -> bool:
    """Graph inputs that hold module parameters (weights). Buffers are not: KV caches live there."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    value = example_value(node)
    if isinstance(value, torch.nn.Parameter):
        return True
    source = str(node.meta.get("grapharg", getattr(node, "_dynamo_source", "")) or "")
    return "_parameters" in source or "_parameters" in node.name


def module_path(node: fx.Node) -> str:
    """Innermost module path from Dynamo's nn_module_stack, e.g. 'model.layers.3.self_attn.indexer'."""
    stack = node.meta.get("nn_module_stack")
    return stack_path(list(stack.values())[-1][0]) if stack else ""


def stack_path(path) -> str:
    """An nn_module_stack entry's path as a module path: "L['self'].layers[3]" -> 'layers.3'."""
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)  # layers[3] -> layers.3
    path = re.sub(r"\._modules\.", ".", path)
    return path.strip(".")


def take_location(new: fx.Node, old: fx.Node) -> None:
    """`new` stands in for `old`: it gets old's module stack and source line (how logs, graph diffs
    and layer numbers place it)."""
    new.meta.update({key: val for key, val in old.meta.items() if key in ("nn_module_stack", "stack_trace")})


def full_module_path(node: fx.Node, prefix: str = "") -> str:
    """The node's module path in the whole model: a graph-break fragment's nodes name their modules
    from the frame's module (`prefix`), e.g. 'layers.1' + 'attn.indexer'."""
    return ".".join(p for p in (prefix, module_path(node)) if p)


def layer_number(path: str) -> int | None:
    """The last integer component of a module path ('model.layers.3.self_attn.indexer' -> 3)."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", path)
    return int(numbers[-1]) if numbers else None


TOPK_ITEMS = {"values": 0, "indices": 1}


def topk_args(topk: fx.Node) -> tuple:
    """(input, k, dim) of a traced torch.topk(x, k, dim=-1, ...) / x.topk(k, dim=-1, ...)."""
    args, kwargs = topk.args, topk.kwargs
    x = args[0] if args else kwargs.get("input")
    k = args[1] if len(args) > 1 else kwargs.get("k")
    dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
    return x, k, dim


def topk_item_users(topk: fx.Node) -> dict[int, list[fx.Node]]:
    """The users of a topk node by which output they take (0 values, 1 indices): `topk[i]` or
    `topk.values` / `topk.indices`. Any other use of the whole result is an error."""
    users: dict[int, list[fx.Node]] = {}
    for user in topk.users:
        item = _topk_item(user, topk)
        if item is None:
            raise ValueError(f"topk '{topk.name}' ({module_path(topk)}) is used whole by '{user.name}' "
                             f"({op_name(user)}); expected only topk[0] / topk[1] / .values / .indices")
        users.setdefault(item, []).append(user)
    return users


def _topk_item(user: fx.Node, topk: fx.Node) -> int | None:
    if user.op != "call_function" or len(user.args) != 2 or user.args[0] is not topk:
        return None
    if user.target is operator.getitem and user.args[1] in (0, 1):
        return user.args[1]
    if user.target is getattr:
        return TOPK_ITEMS.get(user.args[1])
    return None


def add_inputs(gm: fx.GraphModule, inputs: list[tuple[str, fx.Node]]) -> list[fx.Node]:
    """New placeholders after the existing ones (callers append their values to the arguments),
    each with the example value (fake tensor, symbolic sizes) of the node it stands in for."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    added = []
    for name, like in inputs:
        anchor = added[-1] if added else placeholders[-1] if placeholders else None
        with (gm.graph.inserting_after(anchor) if anchor is not None else gm.graph.inserting_before()):
            node = gm.graph.placeholder(name)
        node.meta["example_value"] = example_value(like)
        added.append(node)
    return added


def add_outputs(gm: fx.GraphModule, items: list[tuple[fx.Node, int]]) -> None:
    """Append `node[item]` for each (node, item) to the graph's output tuple (Dynamo returns one)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        raise ValueError(f"expected the graph to return a tuple, got {type(values).__name__}")
    extra = []
    for node, item in items:
        with gm.graph.inserting_after(node):
            got = gm.graph.call_function(operator.getitem, (node, item))
        value = example_value(node)
        got.meta["example_value"] = value[item] if value is not None else None
        extra.append(got)
    output.args = (type(values)([*values, *extra]),)
