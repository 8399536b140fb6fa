"""S layers read the top-k of their F source; their own topk is left without users (DCE removes it)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from torch import fx

from .eliminate_dead_code import IN_PLACE_OPERATORS, VIEWS
from .graph_ops import LAYOUT_OPS, module_path, op_name, tensor_args, writes_in_place

if TYPE_CHECKING:
    from .manager import PassContext


def forward_indices(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: every S layer of ctx.shared reads its in-graph F source's top-k."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for b in ctx.shared:
        own, source = b.match.topk, b.source.topk
        if order[source] > order[own]:
            raise RuntimeError(f"layer {b.match.layer}'s source topk comes after it in the graph")
        _forward_getitems(own, source, order)
        own.replace_all_uses_with(source)  # anything else that held the whole (values, indices) result
        ctx.counters["forward_indices.shared_topk"] += 1
    merged = _merge_repeats(gm, {module_path(b.match.topk) for b in ctx.shared if module_path(b.match.topk)})  # frame-relative
    ctx.counters["forward_indices.merged_ops"] += merged
    return gm


def _forward_getitems(own: fx.Node, source: fx.Node, order: dict) -> None:
    """`own[i]` (.values / .indices) -> the F layer's `source[i]`. Reusing F's node, rather than
    pointing the S layer's getitem at `source`, leaves nothing of the S indexer in the graph (its
    getitem would still carry the S module's nn_module_stack). Where F never read item i, the S
    getitem moves to F: it reads F's result, so it is F's op now."""
    for item in [u for u in own.users if _item_of(u, own) is not None]:
        index = _item_of(item, own)
        same = [u for u in source.users if _item_of(u, source) == index
                and order[u] < order[item]]  # it must exist before the S layer's readers
        if same:
            item.replace_all_uses_with(same[0])
            own.graph.erase_node(item)
        else:
            item.args = (source, *item.args[1:])
            item.meta["nn_module_stack"] = source.meta.get("nn_module_stack", {})


def _item_of(user: fx.Node, topk: fx.Node) -> int | None:
    """0 (values) or 1 (indices) for `topk[i]` / `topk.values` / `topk.indices`, else None."""
    if user.op != "call_function" or len(user.args) != 2 or user.args[0] is not topk:
        return None
    if user.target is operator.getitem:
        return user.args[1] if user.args[1] in (0, 1) else None
    return {"values": 0, "indices": 1}.get(user.args[1]) if user.target is getattr else None


# pure, deterministic ops: two of them on the same inputs give the same tensor
PURE = (LAYOUT_OPS - {"clone"}) | {"add", "sub", "mul", "div", "floordiv", "remainder", "neg", "ge", "gt", "le",
                                   "lt", "eq", "ne", "and", "or", "invert", "where", "masked_fill", "full_like",
                                   "zeros_like", "ones_like", "arange", "new_full", "new_ones", "new_zeros"}


def _merge_repeats(gm: fx.GraphModule, scopes: set[str]) -> int:
    """What an S indexer still does after its top-k, it does to F's top-k now, exactly as F did
    (HF: `.indices.to(torch.int32)`; DeepSeek-V4: the -1 for not-yet-compressed blocks): each such
    op reads the identical earlier op's result instead (common-subexpression elimination, limited to
    S indexer ops and to pure ops whose inputs were not written in between and whose results (or
    views of them) are never written in place). Returns how many ops it merged."""
    merged = 0
    seen: dict[str, fx.Node] = {}
    same: dict[fx.Node, fx.Node] = {}  # node -> the first node computing the same value
    written: list[set] = [set()]  # memory roots written in place so far, one set per node position
    position: dict[fx.Node, int] = {}
    ever_written = {_root(n.args[0]) for n in gm.graph.nodes if _writes(n)}  # results that must stay apart
    for node in list(gm.graph.nodes):
        position[node] = len(written) - 1
        if _writes(node):
            written.append(written[-1] | {_root(node.args[0])})
        if node.op not in ("call_function", "call_method") or op_name(node) not in PURE \
                or _root(node) in ever_written:
            continue
        # value numbering: inputs by their first equal op, so F's own repeats (HF computes one
        # unsqueeze twice) do not hide that the S op repeats one of them
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: same.get(n, n))
        earlier = same[node] = seen.setdefault(repr((node.op, node.target, args)), node)
        if earlier is not node and _in_scopes(node, scopes) and not _written_between(earlier, node, written, position):
            node.replace_all_uses_with(earlier)
            gm.graph.erase_node(node)
            merged += 1
    return merged


def _writes(node: fx.Node) -> bool:
    return bool(node.args) and (writes_in_place(node) or node.target in IN_PLACE_OPERATORS)


def _root(node) -> object:
    """The tensor whose memory `node` is (through views and in-place ops)."""
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node) and (
            op_name(node) in VIEWS or writes_in_place(node) or node.target in IN_PLACE_OPERATORS):
        node = node.args[0]
    return node


def _written_between(earlier: fx.Node, node: fx.Node, written: list[set], position: dict) -> bool:
    """Was any input of `node` written in place after `earlier` read it?"""
    new = written[position[node]] - written[position[earlier]]
    return any(_root(arg) in new for arg in tensor_args(node))


def _in_scopes(node: fx.Node, scopes: set[str]) -> bool:
    path = module_path(node)
    return any(path == scope or path.startswith(scope + ".") for scope in scopes)
