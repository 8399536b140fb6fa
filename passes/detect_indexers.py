"""Find every lightning-indexer subgraph in a Dynamo FX graph and order them by layer.

An indexer is a `topk` over the key axis of a score that is, through masks, scales, layout ops and
a head-weighted reduction only, a ReLU of a product of two activations:

    topk( mask( Σ_h w[..,h] · ReLU(scale · q[..,h,:] · k[..]) ) , dim=-1 )

Variants recognised: matmul / einsum / bmm / `@`; relu / clamp_min(0) / clamp(min=0); head reduction
by a matmul with w or by (s * w[..., None]).sum(dim); scale before or after the ReLU; dtype casts;
additive or masked_fill masks. A MoE router's topk (over sigmoid/softmax of a linear layer) has no
ReLU-of-activation-product behind it and is not an indexer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import fx

from ic_compile.plan import PlanError

from .graph_ops import (LAYOUT_OPS, MASK_SCALE_OPS, PRODUCT_OPS, REDUCE_OPS, full_module_path, is_last_dim,
                        is_parameter, is_relu, layer_number, module_path, op_name, shape_of, tensor_args, topk_args)

if TYPE_CHECKING:
    from .manager import PassContext

MAX_WALK = 200  # nodes visited behind one topk before we give up on it


@dataclass
class IndexerMatch:
    topk: fx.Node  # the topk call; its outputs are read through getitem
    relu: fx.Node  # the ReLU of the q·k product
    product: fx.Node  # q·k (matmul / einsum / bmm)
    query: fx.Node  # first operand of the product
    key: fx.Node  # second operand of the product
    module: str  # module path of the topk, e.g. "model.layers.3.self_attn.indexer"
    layer: int  # layer number from the module path, else the position in graph order
    score_nodes: set = field(default_factory=set)  # nodes on the score path topk <- ... <- product


@dataclass
class Detection:
    matches: list[IndexerMatch]  # ordered by layer
    other_topk: list[fx.Node]  # topk calls that are not indexers (e.g. MoE routers)
    uncertain: list[str]  # reasons why some topk could not be classified with confidence

    @property
    def confident(self) -> bool:
        return not self.uncertain


def detect(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: ctx.detection. Ends the pipeline (ctx.stopped, the graph unchanged) when detection
    is unsure (the caller warns, or raises under strict) or finds no indexer."""
    detection = ctx.detection = detect_indexers(gm, ctx.prefix)
    ctx.counters["detect.indexers"] += len(detection.matches)
    ctx.counters["detect.other_topk"] += len(detection.other_topk)
    ctx.counters["detect.uncertain"] += len(detection.uncertain)
    if not detection.confident:
        ctx.stopped = ("ic-compile left this graph unchanged: indexer detection is unsure — "
                       + "; ".join(detection.uncertain))
    elif not detection.matches:
        ctx.stopped = (f"no lightning indexer found in a graph of {len(gm.graph.nodes)} nodes "
                       f"({len(detection.other_topk)} topk calls, none over ReLU(q·k) scores)")
        _check_no_indexer_code(gm, ctx)
    return gm


def _check_no_indexer_code(gm: fx.GraphModule, ctx: PassContext) -> None:
    """A fragment passes through only if it really holds no indexer: code under one of the model's
    indexer modules that detection did not recognise would otherwise run un-rewritten, silently."""
    layout = ctx.layout
    if layout is None or not layout.indexers:
        return
    paths = {full_module_path(n, layout.prefix) for n in gm.graph.nodes if op_name(n) == "topk"}
    if layout.holds_indexer_code(paths):
        raise PlanError(f"{ctx.stopped}, yet the graph has a topk inside the model's indexer module(s) "
                        f"{sorted(p for p in paths if layout.position(p) is not None)}: an indexer variant "
                        "ic-compile does not recognise. Run ic_compile.explain on the model to see why.")


def detect_indexers(gm: fx.GraphModule, prefix: str = "") -> Detection:
    """prefix: the module path of the frame's `self` in the whole model, when Dynamo compiles a
    submodule's frame on its own (a graph break inside a layer): its nodes' module paths start at
    that submodule ('self_attn.indexer'), the layer number is in the prefix ('model.layers.3')."""
    matches, others, uncertain = [], [], []
    for node in gm.graph.nodes:
        if op_name(node) != "topk":
            continue
        verdict = _classify_topk(node, prefix)
        if isinstance(verdict, IndexerMatch):
            matches.append(verdict)
        elif verdict is None:
            others.append(node)
        else:
            uncertain.append(verdict)
    uncertain += _assign_layers(matches)
    matches.sort(key=lambda m: m.layer)
    return Detection(matches, others, uncertain)


def _classify_topk(topk: fx.Node, prefix: str = "") -> IndexerMatch | str | None:
    """IndexerMatch, None (clearly not an indexer) or a reason string (unsure)."""
    scores = topk.args[0]
    relus, products_without_relu, score_nodes = _walk_score_path(scores)
    where = f"topk '{topk.name}' ({module_path(topk) or 'no module'})"
    if not relus:
        if products_without_relu:
            return (f"{where} ranks a product of two activations with no ReLU: an indexer "
                    "variant we do not know, or not an indexer")
        return None
    if not _over_last_axis(topk):
        return f"{where} has a ReLU score behind it but does not select over the last (key) axis"
    if len(relus) > 1:
        return f"{where} combines {len(relus)} ReLU scores; expected one indexer score"
    product = _product_under_relu(relus[0])
    if product is None:
        return f"{where}: ReLU found but no q·k product of two activations beneath it"
    query, key = _operands(product)
    path = full_module_path(topk, prefix)
    layer = layer_number(path)
    return IndexerMatch(topk, relus[0], product, query, key, path, -1 if layer is None else layer,
                        score_nodes)


def _walk_score_path(start: fx.Node):
    """Walk back from the ranked tensor through ops a score passes unchanged in meaning."""
    relus, bare_products, visited, stack = [], [], set(), [start]
    while stack and len(visited) < MAX_WALK:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in visited:
            continue
        visited.add(node)
        if is_relu(node):
            relus.append(node)
            continue
        stack += _score_inputs(node, bare_products)
    return relus, bare_products, visited


def _score_inputs(node: fx.Node, bare_products: list) -> list[fx.Node]:
    name = op_name(node)
    args = tensor_args(node)
    if name in LAYOUT_OPS or name in REDUCE_OPS:
        return args[:1]
    if name == "masked_fill":
        return args[:1]
    if name == "where":
        return args[1:]
    if name in MASK_SCALE_OPS:
        return args
    if name in PRODUCT_OPS:  # head reduction (w @ s) — unless it is a linear layer
        if any(_is_weight(a) for a in args):
            return []
        bare_products.append(node)
        return args
    return []


def _product_under_relu(relu: fx.Node) -> fx.Node | None:
    node = relu.args[0] if relu.args else relu.kwargs.get("input")
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return None
        name = op_name(node)
        if name in PRODUCT_OPS:
            operands = _operands(node)
            if operands[1] is not None and not any(_is_weight(a) for a in operands):
                return node
            return None
        if name in LAYOUT_OPS or name in ("mul", "div"):
            node = _widest(tensor_args(node))
            continue
        return None
    return None


def _widest(nodes: list[fx.Node]) -> fx.Node | None:
    """Of a scale op's inputs, the score (most dims), not the scale."""
    return max(nodes, key=lambda n: len(shape_of(n) or ()), default=None)


def _operands(product: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    args = [a for a in product.args if isinstance(a, fx.Node)]
    if op_name(product) == "einsum" and len(product.args) == 2 and isinstance(product.args[1], (list, tuple)):
        args = list(product.args[1])
    return (args[0], args[1]) if len(args) >= 2 else (args[0] if args else None, None)


def _is_weight(node: fx.Node, depth: int = 6) -> bool:
    """A parameter seen through layout ops (x @ W.t())."""
    for _ in range(depth):
        if is_parameter(node):
            return True
        if op_name(node) not in LAYOUT_OPS or not tensor_args(node):
            return False
        node = tensor_args(node)[0]
    return False


def _over_last_axis(topk: fx.Node) -> bool:
    x, _, dim = topk_args(topk)
    return is_last_dim(dim, x)


def _assign_layers(matches: list[IndexerMatch]) -> list[str]:
    """Layer numbers from module paths; graph order when no match has one."""
    numbered = [m for m in matches if m.layer >= 0]
    if not numbered:
        for order, m in enumerate(matches):
            m.layer = order
        return []
    if len(numbered) != len(matches):
        return ["some indexers have a layer number in their module path and some do not: "
                "cannot order layers with confidence"]
    layers = [m.layer for m in matches]
    if len(set(layers)) != len(layers):
        return [f"two indexers share a layer number ({sorted(layers)}): cannot tell layers apart"]
    return []
