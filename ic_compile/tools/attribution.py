"""Which decoder layer each graph node belongs to, and which indexer key-cache writes a rewrite removed:
the attribution `explain` and `graph_diff` count with.

A node's layer comes from Dynamo's `nn_module_stack` (the numbered layer it ran under), else from the
layer every reader of it belongs to; nodes read by several layers, the graph output and nodes outside
the layer stack have none (`attribute_layers` says why).
"""

from __future__ import annotations

import re

from torch import fx

from ic_compile.passes.graph_ops import layer_number

from ..rewrite import RewriteResult


def frame_prefix(result: RewriteResult) -> str:
    """Module path of the graph's frame in the model ('' for the model's own frame): a layer compiled on
    its own after a graph break names its nodes' modules from the layer ('attn.indexer')."""
    return result.layout.prefix if result.layout is not None else ""


def key_cache_writes_removed(result: RewriteResult) -> dict[int, bool | None]:
    """S layer -> True if every write of its indexer caches (the key-cache append or in-place writes, scale
    caches, attribute state) found in the original graph is absent from the rewritten one, False if any is
    still there, None if the original graph writes no such cache (e.g. captured without a cache).
    Counted from the graphs, not from what the pass believes it did."""
    after = {n.name for n in result.gm.graph.nodes}
    caches = {c.layer: c for c in result.caches}
    counted: dict[int, bool | None] = {}
    for b in result.bindings:
        if b.role != "S":
            continue
        cache = caches.get(b.match.layer)
        writes = [] if cache is None else _cache_writes(cache)
        counted[b.match.layer] = None if not writes else not any(w in after for w in writes)
    return counted


def _cache_writes(cache) -> list[str]:
    """Every node through which an S indexer stores state across calls: the key-cache append or its
    in-place writes, writes into other buffers (per-key scale caches), state handed out of the graph."""
    return ([cache.concat.name] if cache.concat is not None else []) + [w.name for w in cache.writers] \
        + [w.name for _, writers in cache.buffers for w in writers] + [s.name for s in cache.states]


def key_cache_notes(counted: dict[int, bool | None]) -> list[str]:
    """Why an S layer's key-cache bytes count as 0."""
    absent = [layer for layer, removed in counted.items() if removed is None]
    kept = [layer for layer, removed in counted.items() if removed is False]
    notes = []
    if absent:
        notes.append(f"S layers {absent}: this graph writes no indexer key cache (captured without a cache), "
                     "so no key-cache write is counted as removed (0 B/token); capture with a cache "
                     "(ic --with-cache; API: use_cache=True and a DynamicCache / StaticCache) to count them")
    if kept:
        notes.append(f"S layers {kept} still write their indexer key cache in the rewritten graph (cache "
                     "layout not recognised by drop_shared_key_cache): 0 bytes counted as freed")
    return notes


def node_layers(gm: fx.GraphModule, prefix: str = "") -> dict[str, int | None]:
    """Layer of every node (None: shared by several layers or outside them); see `attribute_layers`."""
    return attribute_layers(gm, prefix)[0]


def attribute_layers(gm: fx.GraphModule, prefix: str = "") -> tuple[dict[str, int | None], dict[str, str]]:
    """(layer, why) of every node; `prefix`: the graph's frame in the model (`frame_prefix`), whose
    own nodes (no module of their own) belong to the layer it names. In order of trust:
    - the innermost entry of its nn_module_stack under a numbered layer (a helper function such as HF
      DeepSeek-V3.2's `apply_rotary_pos_emb` is the innermost entry; the layer is the one above it);
    - else the single layer all its users belong to (parameters, graph inputs, helper values);
    - else None, with the reason: read by several layers, the graph output, outside every layer."""
    nodes = list(gm.graph.nodes)
    layers: dict[str, int | None] = {n.name: _stack_layer(n, prefix) for n in nodes}
    why = {n.name: "module path" for n in nodes if layers[n.name] is not None}
    for node in reversed(nodes):  # users come later in the graph: their layer is known first
        if layers[node.name] is not None or node.op == "output":
            continue
        readers = {layers[u.name] for u in node.users}
        if len(readers) == 1 and None not in readers:
            layers[node.name] = readers.pop()
            why[node.name] = f"feeds only layer {layers[node.name]}"
    for node in nodes:
        if node.name in why:
            continue
        readers = sorted({layers[u.name] for u in node.users} - {None})
        why[node.name] = ("graph output (returns every layer's results and cache state)" if node.op == "output"
                          else f"shared: read by layers {readers}" if len(readers) > 1
                          else "outside the layers (embedding, final norm, head, or values they read)")
    return layers, why


def _stack_layer(node: fx.Node, prefix: str = "") -> int | None:
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    paths = [".".join(p for p in (prefix, _clean_path(entry[0])) if p) for entry in stack.values()]
    for path in reversed([prefix, *paths] if prefix else paths):
        block = re.search(r"(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+)(?=\.|$)", path)
        layer = int(block.group(1)) if block else layer_number(path)  # not an expert's index
        if layer is not None:
            return layer
    return None


def _clean_path(path) -> str:
    """"L['self'].model.layers[3]" -> "model.layers.3" (as graph_ops.module_path writes it)."""
    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return re.sub(r"\._modules\.", ".", path).strip(".")


def parameter_path(node: fx.Node) -> str:
    """'model.layers.1.self_attn.indexer.wq_b.weight' from Dynamo's lifted placeholder name
    ('l_self_modules_model_modules_layers_modules_1_..._parameters_weight_'); get_attr: its target."""
    if node.op == "get_attr":
        return str(node.target)
    name = re.sub(r"^l_(self_)?", "", node.name).rstrip("_")
    return re.sub(r"(?:^|_)(?:modules|parameters|buffers)_", ".", name).strip(".")


__all__ = ["attribute_layers", "frame_prefix", "key_cache_notes", "key_cache_writes_removed",
           "node_layers", "parameter_path"]
