"""Which dim of an indexer's tensors is which: dim labels for passes/lower_indexer.py.

Each dim of a tensor on an indexer's score path gets one letter:
    b batch, s query, h head, t key, d channel, 1 a singleton (unsqueezed, or broadcast over)
The product q·k tells b, t, d and the query's two own dims, x and y. Which of x and y is the heads is
known only where the heads are reduced -- a sum over one of them, HF's matmul with the weights, an
einsum with them -- since code writes both [B,S,H,T] and head-major [B,H,S,T] scores, and a query's
producers tell nothing (DeepSeek-V4's q is transposed twice around its rope) nor do shapes (S == H
and T == D happen: a 32-token prompt, 32 heads).

    product_labels(product, q, k) -> (the query tensor, its labels, the key tensor behind the key operand,
                                      its labels, the scores' labels), or why not
    input_labels / output_labels  -> a layout op's labels, one side from the other
    relabel(x, layout, want)      -> (runtime) x with its dims as `want`: squeeze, permute, unsqueeze
"""

from __future__ import annotations

import torch
from torch import fx

from .graph_ops import example_value, op_name, shape_of

KEY_LAYOUTS = ("btd", "td")  # how the op wants keys: [B,T,D], or [T,D] for models without a batch dim
CASTS = {"float", "to", "type", "half", "bfloat16", "double"}
_SAME_LABELS = CASTS | {"contiguous", "clone", "type_as"}  # ops whose output dims are their input's


def product_labels(product: fx.Node, query: fx.Node, key: fx.Node) -> tuple[fx.Node, str, fx.Node, str, str] | str:
    """(the query tensor, its labels, the key tensor, its labels, the product's labels; x, y: the
    query's own dims). The query tensor is the product's query operand, or for a product of queries
    and heads merged into one dim (q.reshape(B, S*H, D) @ kT, labelled m), the tensor before that
    reshape; the key tensor is the one behind the key operand (key_source)."""
    name = op_name(product)
    if name == "einsum":
        labels = _einsum_labels(product.args[0])
        if isinstance(labels, str):
            return labels
        q_labels, k_labels, out = labels
        found = key_source(key, k_labels)
    elif name in ("matmul", "bmm", "mm"):
        merged = _merged_query(query)
        labels = _matmul_labels(query, key) if merged is None else _merged_labels(query, key)
        if isinstance(labels, str):
            return labels
        q_labels, found, out = labels
        query = query if merged is None else merged
    else:
        return f"q·k product '{name}' not recognised"
    if found is None:
        return f"no [B,T,D] key tensor behind the product's key operand {shape_of(key)}"
    return query, q_labels, *found, out


def _merged_query(query: fx.Node) -> fx.Node | None:
    """q when the query operand is q [B,X,Y,D] (or [X,Y,D]) reshaped to [B,X*Y,D] ([X*Y,D])."""
    if op_name(query) not in ("view", "reshape", "flatten") or not isinstance(query.args[0], fx.Node):
        return None
    source, shape = shape_of(query.args[0]), shape_of(query)
    if source is None or shape is None or len(source) != len(shape) + 1 or len(shape) not in (2, 3):
        return None
    lead = len(shape) - 2  # a batch dim, or none
    same = tuple(source[:lead]) == tuple(shape[:lead]) and source[-1] == shape[-1]
    return query.args[0] if same and source[lead] * source[lead + 1] == shape[lead] else None


def _merged_labels(operand: fx.Node, key: fx.Node) -> tuple[str, tuple | None, str] | str:
    """(the unmerged query's labels, key_source, the product's labels) for [B,X*Y,D] @ [B,D,T]."""
    lead = "b" if len(shape_of(operand)) == 3 else ""
    if len(shape_of(key) or ()) != len(shape_of(operand)):
        return f"the merged query {shape_of(operand)} and the key operand {shape_of(key)} differ in rank"
    return lead + "xyd", key_source(key, lead + "dt"), lead + "mt"


def _einsum_labels(spec) -> tuple[str, str, str] | str:
    if not isinstance(spec, str) or "->" not in spec or "." in spec:
        return f"einsum {spec!r} has no explicit output ('->') or has '...'"
    inputs, out = spec.replace(" ", "").split("->")
    subs = inputs.split(",")
    if len(subs) != 2 or any(len(set(s)) != len(s) for s in (*subs, out)):
        return f"einsum {spec!r} is not a product of two operands"
    q_sub, k_sub = subs
    role = {}
    for c in dict.fromkeys(q_sub + k_sub):
        in_q, in_k, in_out = c in q_sub, c in k_sub, c in out
        if in_q and in_k:
            role[c] = "b" if in_out else "d"
        elif in_out:
            role[c] = "t" if in_k else "?"
        else:
            return f"einsum {spec!r} sums over a dim of one operand"
    own = [c for c in q_sub if role[c] == "?"]
    if len(own) != 2 or sorted(r for r in role.values() if r != "?") not in (["b", "d", "t"], ["d", "t"]):
        return f"einsum {spec!r} is not queries [B,S,H,D] times keys [B,T,D]"
    role[own[0]], role[own[1]] = "x", "y"
    return tuple("".join(role[c] for c in sub) for sub in (q_sub, k_sub, out))


def _matmul_labels(query: fx.Node, key: fx.Node) -> tuple[str, tuple | None, str] | str:
    """(q's labels, key_source, the product's labels) for q [.., M, D] @ kT [.., D, T], both 4-d: one
    leading dim of the keys is their batch, the other is 1 (broadcast over the query's own dim there);
    the key's walk back to [B,T,D] says which."""
    q_shape, k_shape = shape_of(query), shape_of(key)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        return "matmul of other than two 4-d operands (queries [B,S,H,D] @ keys [B,1,D,T])"
    for lead in ("b1", "1b"):
        if (found := key_source(key, lead + "dt")) is not None:
            q_lead = "".join("b" if c == "b" else "x" for c in lead)
            return q_lead + "yd", found, q_lead + "yt"
    return f"no [B,T,D] key tensor behind the product's key operand {tuple(k_shape)}"


def key_source(node: fx.Node, labels: str) -> tuple[fx.Node, str] | None:
    """The key tensor behind a product's key operand (labels as the product reads it), walking back
    through layout ops and widening casts (HF: k.transpose(-1, -2).float().unsqueeze(1)): the first
    one labelled btd / td (a cache read as buf[:B, :T] stays that slice, not the buffer), else the
    first with those labels in another order. A narrowing cast ends the walk (DeepSeek's fp8 keys:
    the model's values are the cast's)."""
    found = None
    for _ in range(8):
        narrowing = op_name(node) in CASTS and not widening(node)
        if _is_key(labels) and (narrowing or op_name(node) not in CASTS):
            if labels in KEY_LAYOUTS or narrowing:
                return node, labels
            found = found or (node, labels)
        source = node.args[0] if node.args else None
        if narrowing or not isinstance(source, fx.Node):
            break
        labels = input_labels(node, labels, shape_of(source))
        if labels is None:
            break
        node = source
    return found


def _is_key(labels: str) -> bool:
    return sorted(labels) in (["b", "d", "t"], ["d", "t"])


def widening(cast: fx.Node) -> bool:
    """The cast keeps every value: floats to a dtype of more bits, or of the same dtype."""
    source, out = example_value(cast.args[0]), example_value(cast)
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False
    if source.dtype == out.dtype:
        return True
    return source.is_floating_point() and out.is_floating_point() and out.element_size() > source.element_size()


def input_labels(node: fx.Node, labels: str, in_shape) -> str | None:
    """Labels of a layout op's input given its output's, or None when the op mixes dims."""
    name, args, out_shape = op_name(node), node.args[1:], shape_of(node)
    if in_shape is None or out_shape is None:
        return None
    if name in _SAME_LABELS or (name in ("view", "reshape", "expand") and tuple(in_shape) == tuple(out_shape)):
        return labels
    if name == "unsqueeze" and len(args) == 1 and isinstance(args[0], int):
        d = args[0] % len(labels)
        return labels[:d] + labels[d + 1:] if labels[d] == "1" else None
    if name == "getitem":
        index = _full_index(args[0], len(in_shape))
        if index is None or any(i is None and labels[o] != "1" for o, i in enumerate(index)):
            return None
        return "".join(labels[o] for o, i in enumerate(index) if i is not None)
    order = _permutation(node, len(labels))
    if order is None:
        return None
    out = [""] * len(labels)
    for o, i in enumerate(order):
        out[i] = labels[o]
    return "".join(out)


def output_labels(node: fx.Node, labels: str, in_shape) -> str | None:
    """Labels of a layout op's output given its input's, or None when the op mixes dims."""
    name, args, out_shape = op_name(node), node.args[1:], shape_of(node)
    if in_shape is None or out_shape is None:
        return None
    if name in _SAME_LABELS or (name in ("view", "reshape", "expand", "narrow") and tuple(in_shape) == tuple(out_shape)):
        return labels
    if name == "unsqueeze" and len(args) == 1 and isinstance(args[0], int):
        d = args[0] % len(out_shape)
        return labels[:d] + "1" + labels[d:]
    if name == "squeeze":
        dims = args[0] if args else None
        dims = range(len(in_shape)) if dims is None else (dims if isinstance(dims, (list, tuple)) else [dims])
        gone = {d % len(in_shape) for d in dims if in_shape[d] == 1}
        return "".join(c for d, c in enumerate(labels) if d not in gone)
    if name in ("view", "reshape"):
        return _reshaped(labels, in_shape, out_shape)
    if name == "getitem":
        index = _full_index(args[0], len(in_shape))
        return None if index is None else "".join("1" if i is None else labels[i] for i in index)
    order = _permutation(node, len(labels))
    return None if order is None else "".join(labels[i] for i in order)


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """For a dim-permuting op: output dim o is input dim order[o]."""
    name, args = op_name(node), node.args[1:]
    order = list(range(rank))
    if name in ("transpose", "swapaxes") and len(args) == 2 and all(isinstance(a, int) for a in args):
        a, b = (d % rank for d in args)
        order[a], order[b] = b, a
        return order
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = [d % rank for d in dims] if all(isinstance(d, int) for d in dims) else None
        return dims if dims is not None and sorted(dims) == order else None
    if name == "t" and rank == 2:
        return [1, 0]
    if name == "getattr" and args and args[0] in ("mT", "T") and rank >= 2:
        return order[:-2] + [rank - 1, rank - 2] if args[0] == "mT" else order[::-1]
    if name == "movedim" and len(args) == 2 and all(isinstance(a, int) for a in args):
        src, dst = (d % rank for d in args)
        rest = [d for d in order if d != src]
        return rest[:dst] + [src] + rest[dst:]
    return None


def _full_index(index, rank: int) -> list | None:
    """x[index] with only None (a new dim) and full slices (a kept dim): per output dim, the input dim
    it reads or None (new); None for any other index (an int drops a dim, a slice changes a size)."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    named = sum(i is not None and i is not Ellipsis for i in index)
    out, d = [], 0
    for i in index:
        if i is None:
            out.append(None)
        elif i is Ellipsis:
            out += list(range(d, d + rank - named))
            d += rank - named
        elif isinstance(i, slice) and i == slice(None):
            out.append(d)
            d += 1
        else:
            return None
    return out + list(range(d, rank))


def _reshaped(labels: str, in_shape, out_shape) -> str | None:
    """A view that only adds or drops size-1 dims: labels carried over in order, "1" for new dims; or
    that splits the merged query dim m into its two (x, y, in the query's order)."""
    if "m" in labels:
        d = labels.index("m")
        if len(out_shape) != len(in_shape) + 1 or tuple(out_shape[:d]) != tuple(in_shape[:d]) \
                or tuple(out_shape[d + 2:]) != tuple(in_shape[d + 1:]) or out_shape[d] * out_shape[d + 1] != in_shape[d]:
            return None
        return labels[:d] + "xy" + labels[d + 1:]
    out, i = [], 0
    for size in out_shape:
        while i < len(labels) and in_shape[i] == 1 and size != 1:
            i += 1  # a size-1 input dim dropped
        if i < len(labels) and in_shape[i] == size:
            out.append(labels[i])
            i += 1
        elif size == 1:
            out.append("1")
        else:
            return None
    if any(in_shape[j] != 1 for j in range(i, len(labels))):
        return None
    return "".join(out)


def aligned_labels(other: fx.Node, via: fx.Node, labels: str) -> str | None:
    """Labels of `other` broadcast against `via` (labelled `labels`): right-aligned; a dim of size 1
    where via's is not is "1"."""
    shape, via_shape = shape_of(other), shape_of(via)
    if shape is None or via_shape is None or len(shape) > len(labels):
        return None
    offset = len(labels) - len(shape)
    out = []
    for d, size in enumerate(shape):
        full = via_shape[offset + d]
        if size == full:
            out.append(labels[offset + d])
        elif size == 1:
            out.append("1")
        else:
            return None
    return "".join(out)


def relabel(x: torch.Tensor, layout: str, want: str) -> torch.Tensor:
    """x, whose dims are labelled `layout`, with its dims as `want` (views only): dims labelled "1"
    or absent from `want` (of size 1) squeezed, the rest permuted, `want`'s other labels new dims."""
    if layout == want:
        return x
    drop = [d for d, c in enumerate(layout) if c == "1" or c not in want]
    kept = [c for c in layout if c != "1" and c in want]
    x = x.squeeze(drop) if drop else x
    x = x.permute([kept.index(c) for c in want if c in kept])
    for d, c in enumerate(want):
        if c not in kept:
            x = x.unsqueeze(d)
    return x
