"""Recognise MLA keys/values expanded from a shared latent (HF DeepSeek-V3.2 / GLM-5 `expand_kv`).

Matched (torch-level Dynamo graph), H heads, latent width Dl, nope dim dn, value dim dv, rope dim dr:
    kv    = linear(latent[B,1,T,Dl], W[H*(dn+dv), Dl], None).view(B, T, H, dn+dv).transpose(1, 2)
    k_nope, v = split(kv, [dn, dv], dim=-1)
    key   = new_empty(B,H,T,dn+dr); key[..., :dn].copy_(k_nope); key[..., dn:].copy_(rope.expand(-1,H,-1,-1))
            (or key = cat((k_nope, rope.expand(-1,H,-1,-1)), -1))        rope: [B,1,T,dr]
Then  q_h·key_h[t] = (W_k,h^T q_nope_h)·latent[t] + q_rope_h·rope[t]  and  Σ p v_h = W_v,h (Σ p latent):
attention can run on one shared [T, Dl+dr] row per key for all heads ("absorbed" MLA).
The absorbed op reads latent and rope when the attention runs, the original graph when it
expands them: if either's storage (a cache buffer it is a view of, say) is written in place in
between, the two differ, so that is refused too. Anything that differs returns None (the caller
keeps the per-head form).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .graph_ops import LAYOUT_OPS, op_name, shape_of, writes_in_place

# ops whose result may share storage with their first argument
ALIASING_OPS = LAYOUT_OPS | {"split", "chunk", "unbind", "select", "slice", "as_strided", "t", "view_as", "detach"}


@dataclass
class LatentKV:
    latent: fx.Node  # [B,1,T,Dl]
    rope: fx.Node  # [B,1,T,dr] shared rope key
    weight: fx.Node  # kv_b_proj weight [H*(dn+dv), Dl]
    nope_dim: int  # dn


def match_latent_kv(key: fx.Node, value: fx.Node, reader: fx.Node | None = None) -> LatentKV | None:
    """`reader`: the node that will read the latent (the attention); None = graph end."""
    split = _split_source(value, 1)
    if split is None:
        return None
    dn, dv = split.args[1]
    expanded = _expanded_kv(split.args[0])
    if expanded is None:
        return None
    latent, weight = expanded
    parts = _key_parts(key)
    if parts is None:
        return None
    nope, rope_expanded = parts
    if _split_source(nope, 0) is not split or op_name(rope_expanded) != "expand":
        return None
    rope = rope_expanded.args[0]
    if not _shapes_fit(latent, rope, weight, split.args[0], key, dn, dv):
        return None
    linear = split.args[0].args[0].args[0]
    if any(_written_between(n, linear, reader) for n in (latent, rope)):
        return None
    return LatentKV(latent, rope, weight, dn)


def _written_between(node: fx.Node, start: fx.Node, end: fx.Node | None) -> bool:
    """Is `node`'s storage (through any view of its base) written in place after `start`, before `end`?"""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    lo, hi = order[start], order[end] if end is not None else len(order)
    base = node
    while op_name(base) in ALIASING_OPS and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    stack, seen = [base], {base}
    while stack:
        alias = stack.pop()
        for user in alias.users:
            writes = writes_in_place(user)
            if writes and user.args and user.args[0] is alias and lo < order[user] < hi:
                return True
            if (op_name(user) in ALIASING_OPS or writes) and user not in seen:  # x.copy_(y) returns x
                seen.add(user)
                stack.append(user)
    return False


def _split_source(node: fx.Node, part: int) -> fx.Node | None:
    """`split(x, [a, b], dim=-1)` when node = its `part`-th output."""
    if op_name(node) != "getitem" or node.args[1] != part:
        return None
    split = node.args[0]
    if op_name(split) != "split" or len(split.args) < 2:
        return None
    sizes, dim = split.args[1], split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    ok = isinstance(sizes, (list, tuple)) and len(sizes) == 2 and all(isinstance(s, int) for s in sizes)
    return split if ok and dim in (-1, 3) else None


def _expanded_kv(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """linear(latent, W, None).view(B, T, H, dn+dv).transpose(1, 2) -> (latent, W)."""
    if op_name(node) != "transpose" or tuple(node.args[1:3]) not in ((1, 2), (2, 1)):
        return None
    view = node.args[0]
    if op_name(view) not in ("view", "reshape"):
        return None
    linear = view.args[0]
    if op_name(linear) != "linear" or len(linear.args) < 2:
        return None
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    return (linear.args[0], linear.args[1]) if bias is None else None


def _key_parts(key: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(nope part, rope part) of key = cat((nope, rope), -1) or of a buffer filled by two copy_."""
    if op_name(key) == "cat":
        parts, dim = key.args[0], key.kwargs.get("dim", key.args[1] if len(key.args) > 1 else 0)
        return (parts[0], parts[1]) if len(parts) == 2 and dim in (-1, 3) else None
    if op_name(key) != "new_empty":
        return None
    written = {}
    for view in key.users:
        if op_name(view) != "getitem" or view.args[0] is not key:
            continue
        for copy in view.users:
            if op_name(copy) == "copy_" and copy.args[0] is view:
                written[_last_dim_slice(view.args[1])] = copy.args[1]
    starts = sorted(s for s in written if s is not None)
    if len(starts) != 2 or starts[0][0] != 0 or starts[0][1] != starts[1][0] or starts[1][1] is not None:
        return None
    return written[starts[0]], written[starts[1]]


def _last_dim_slice(index) -> tuple[int, int | None] | None:
    """`(..., slice(a, b))` -> (a or 0, b); anything else -> None."""
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis):
        return None
    s = index[1]
    if not isinstance(s, slice) or s.step not in (None, 1):
        return None
    return (s.start or 0, s.stop)


def _shapes_fit(latent, rope, weight, expanded, key, dn: int, dv: int) -> bool:
    """latent [B,1,T,Dl], rope [B,1,T,dr], weight [H*(dn+dv),Dl], expanded [B,H,T,dn+dv], key [B,H,T,dn+dr]."""
    shapes = [shape_of(n) for n in (latent, rope, weight, expanded, key)]
    if any(s is None or len(s) != n for s, n in zip(shapes, (4, 4, 2, 4, 4))):
        return False
    (_, one, _, dl), (_, one_r, _, dr), (rows, cols), (_, heads_kv, _, _), (_, heads, _, dk) = shapes
    static = all(isinstance(x, int) for x in (one, one_r, dl, dr, rows, cols, heads_kv, heads, dk))
    return (static and one == one_r == 1 and cols == dl and heads_kv == heads and rows == heads * (dn + dv)
            and dk == dn + dr)


__all__ = ["LatentKV", "match_latent_kv"]
