"""The score path of a detected indexer, from the q·k product to its topk: what each op is.

    walk_score_path(match, labels) -> ScorePath (scale, head weights and their dims, the dim the heads
                                      were reduced over, mask, per-key factor, the ranked scores' dims)
                                      or why the path is not a known indexer form

Dims are tracked as labels (passes/indexer_layout.py) from the product's, through every op.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .detect_indexers import IndexerMatch
from .graph_ops import LAYOUT_OPS, op_name, shape_of
from .indexer_layout import aligned_labels, output_labels


def walk_score_path(match: IndexerMatch, labels: str) -> ScorePath | str:
    """Each op between the product (its output labelled `labels`) and the topk, in graph order."""
    chain = _chain(match)
    if isinstance(chain, str):
        return chain
    path = ScorePath(labels)
    for node, via in chain:
        why = _step(path, node, via, match)
        if why:
            return why
    return path


@dataclass
class ScorePath:
    """What the walk up the score path has found; labels: the current node's dims (indexer_layout)."""
    labels: str
    scale: float = 1.0
    w: fx.Node | None = None
    w_labels: str = ""
    head: str | None = None  # "x" | "y": the product's dim the heads were reduced over
    mask: fx.Node | None = None
    mask_kind: str = "none"
    fill: object = float("-inf")
    key_scale: fx.Node | None = None
    after_relu: bool = False
    shifted: bool = False  # a constant was added after the ReLU (the ranking is the same, the values not)


def _step(path: ScorePath, node: fx.Node, via: fx.Node, match: IndexerMatch) -> str | None:
    """Take one op of the score path into `path`; why not, when it is not part of a known form."""
    name = op_name(node)
    if name in ("mul", "div") and _scalar_of(node, via) is not None and (name == "mul" or node.args[0] is via):
        c = _scalar_of(node, via)
        path.scale = path.scale * c if name == "mul" else path.scale / c
    elif name in ("add", "sub") and _scalar_of(node, via) is not None and (name == "add" or node.args[0] is via):
        if not path.after_relu:
            return "a constant added to the scores before the ReLU"
        path.shifted = True  # after the ReLU it adds c, or c·Σ_h w, to a whole row: the same keys rank first
    elif path.w is None and (weights := _head_weights(node, via, path.labels)) is not None:
        if not path.after_relu:  # relu(w·x) = w·relu(x) only for w >= 0, which a graph cannot tell
            return "head weights applied before the ReLU"
        path.w, path.w_labels, path.labels, head = weights
        path.head = head or path.head
    elif name == "masked_fill" and path.mask is None and node.args[2] == float("-inf"):
        path.mask, path.mask_kind = node.args[1], "fill"
    elif name == "add" and path.mask is None:
        path.mask, path.mask_kind, path.fill = [a for a in node.args if a is not via][0], "additive", "mask_min"
    elif name == "where" and path.mask is None and node.args[1] is via:
        path.mask, path.mask_kind, path.fill = node.args[0], "allowed", node.args[2]
    elif name == "mul" and path.key_scale is None and (factor := _per_key(node, via)) is not None:
        path.key_scale = factor
    elif name == "sum":
        return _head_sum(path, node)
    elif name in ("relu", "clamp_min", "clamp") or node is match.relu:
        path.after_relu = path.after_relu or node is match.relu
    elif name in LAYOUT_OPS or name == "getattr":
        labels = output_labels(node, path.labels, shape_of(via))
        if labels is None:
            return f"'{name}' on the score path mixes its dims ({shape_of(via)} -> {shape_of(node)})"
        path.labels = labels
    else:
        return f"op '{name}' on the score path is not part of a known indexer form"
    if name in ("masked_fill", "add", "where") and (rank := len(shape_of(node) or ())) > len(path.labels):
        path.labels = "1" * (rank - len(path.labels)) + path.labels  # a mask of more dims broadcast over
    return None


def _head_sum(path: ScorePath, node: fx.Node) -> str | None:
    """sum(dim) over one of the query's own dims: the heads (HF's mul-and-sum form)."""
    dim = _sum_dim(node)
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if not isinstance(dim, int) or path.head is not None:
        return "a sum on the score path that is not one head reduction"
    d = dim % len(path.labels)
    if path.labels[d] not in ("x", "y"):
        return "the head reduction sums over a dim other than the heads"
    path.head = path.labels[d]
    path.labels = path.labels[:d] + ("1" if keepdim else "") + path.labels[d + 1:]
    return None


def _head_weights(node: fx.Node, via: fx.Node, labels: str):
    """(w, w's labels, the output's labels, the dim reduced or None) when `node` applies the head
    weights: scores * w (w over the query's dims only, e.g. [B,S,H,1]; the sum comes later), HF's
    matmul(w [B,S,1,H], scores [B,S,H,T]), or an einsum of the scores and w that sums over a query dim."""
    name = op_name(node)
    if name == "einsum":
        return _einsum_weights(node, via, labels)
    others = [a for a in node.args if a is not via and isinstance(a, fx.Node)]
    if len(others) != 1:
        return None
    w = others[0]
    if name == "mul":
        w_labels = aligned_labels(w, via, labels)
        if w_labels is None or "t" in w_labels or "d" in w_labels or not set(w_labels) & {"x", "y"}:
            return None
        return w, w_labels, labels, None
    w_shape, shape = shape_of(w), shape_of(via)
    if name != "matmul" or node.args[1] is not via or w_shape is None or shape is None \
            or len(w_shape) != len(shape) or w_shape[-2] != 1 or labels[-2] not in ("x", "y"):
        return None
    if w_shape[-1] != shape[-2] or any(a not in (1, b) for a, b in zip(w_shape[:-2], shape[:-2])):
        return None
    lead = "".join(c if a == b else "1" for a, b, c in zip(w_shape[:-2], shape[:-2], labels))
    return w, lead + "1" + labels[-2], labels[:-2] + "1" + labels[-1], labels[-2]


def _einsum_weights(node: fx.Node, via: fx.Node, labels: str):
    operands = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
    spec = node.args[0]
    if len(operands) != 2 or via not in operands or not isinstance(spec, str) or "->" not in spec or "." in spec:
        return None
    inputs, out = spec.replace(" ", "").split("->")
    subs = inputs.split(",")
    if len(subs) != 2 or len(subs[operands.index(via)]) != len(labels):
        return None
    s_sub, w_sub = subs[operands.index(via)], subs[1 - operands.index(via)]
    of = dict(zip(s_sub, labels))
    reduced = [c for c in s_sub if c not in out]
    if any(c not in of for c in w_sub + out) or len(reduced) != 1 or of[reduced[0]] not in ("x", "y") \
            or reduced[0] not in w_sub or "t" in "".join(of[c] for c in w_sub):
        return None
    w = operands[1 - operands.index(via)]
    return w, "".join(of[c] for c in w_sub), "".join(of[c] for c in out), of[reduced[0]]


def _per_key(node: fx.Node, via: fx.Node) -> fx.Node | None:
    """The other factor of `node` when it is one number per (batch, key): the scores' shape with 1 at
    every dim but the batch (or 1) and the last (DeepSeek's `* k_scale[:, None, :]`)."""
    others = [a for a in node.args if a is not via]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        return None
    shape, scores = shape_of(others[0]), shape_of(via)
    if shape is None or scores is None or len(shape) != len(scores) or len(shape) < 3:
        return None
    if shape[-1] != scores[-1] or shape[0] not in (1, scores[0]) or any(d != 1 for d in shape[1:-1]):
        return None
    return others[0]


def _chain(match: IndexerMatch):
    """(node, the input it reads from the score path) from the product up to the topk input."""
    on_path = {match.product}
    chain = []
    for node in _topo(match):
        inputs = [a for a in node.all_input_nodes if a in on_path]
        if not inputs:
            continue
        if len(inputs) > 1:
            return f"'{node.name}' combines two score tensors"
        on_path.add(node)
        chain.append((node, inputs[0]))
    if not chain or chain[-1][0] is not match.topk.args[0]:
        return "the score path does not end at the topk input"
    return chain


def _topo(match: IndexerMatch) -> list[fx.Node]:
    """Score-path nodes above the product, in graph order (incl. those between product and ReLU)."""
    nodes = set(match.score_nodes) | {match.relu} | _between(match.product, match.relu)
    order = {n: i for i, n in enumerate(match.topk.graph.nodes)}
    return sorted(nodes - {match.product}, key=order.__getitem__)


def _between(low: fx.Node, high: fx.Node) -> set:
    found, stack = set(), list(high.all_input_nodes)
    while stack:
        node = stack.pop()
        if node is low or node in found or low not in _ancestors(node, 16):
            continue
        found.add(node)
        stack += node.all_input_nodes
    return found


def _ancestors(node: fx.Node, depth: int) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _sum_dim(node: fx.Node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim


def _scalar_of(node: fx.Node, via: fx.Node):
    others = [a for a in node.args if a is not via]
    return others[0] if len(others) == 1 and isinstance(others[0], (int, float)) else None
