"""`ic diff` / `graph_diff(model, example_inputs, plan=...)`: what the IndexCache rewrite did, per layer.

For every indexer layer: its role and source F layer, the graph nodes removed / rewired, and what the
plan saves — indexer FLOPs at a sequence length, indexer weight bytes no longer read, indexer key-cache
bytes per token no longer written — plus the node-level diff. Three views: `str(diff)` (terminal
table), `diff.to_dict()` (JSON, schema below) and `diff.to_html(path)` (one self-contained page with
the annotated graph, filterable by layer).

Indexer FLOPs (prefill of L tokens, batch 1, counted from the matched nodes, so HF and reference
models alike; documented in docs/inspect_and_export.md):
    q·k product (causal):  L²/2 · H · D · 2 = L² · H · D      H, D from the query operand's shape
    each projection:       2 · L · numel(W)                    W = the parameter a linear/matmul reads
                           (q: q_lora→H·D, k: hidden→D, head weights: hidden→H)
Element-wise work (ReLU, scale, rope, norm, mask) and the head-weighted sum (L²/2·H·2, 1/D of the
product) are not counted. A layer's indexer = the nodes under its indexer module path.
Removed FLOPs of an S layer = the same sums over the nodes the rewrite removed from that layer.
Weight bytes freed = parameters whose every reader was removed. Key-cache bytes per token freed = D ·
element size of the key, per S layer (an S layer never needs its indexer key cache).

JSON schema (schema_version 1):
    {"schema_version": 1, "plan": "FSSF", "seq_len": int, "nodes_before": int, "nodes_after": int,
     "layers": [{"layer", "role" ("F"|"S"), "source", "module", "heads", "head_dim",
                 "indexer_flops", "flops_removed", "removed_nodes", "rewired_nodes",
                 "weight_bytes_freed", "freed_parameters": [str], "key_cache_bytes_per_token_freed",
                 "key_cache_write_removed" (true|false|null: no cache in this graph)}],
     "totals": {"indexer_flops", "flops_removed", "flops_removed_fraction", "removed_nodes",
                "rewired_nodes", "added_nodes", "weight_bytes_freed", "key_cache_bytes_per_token_freed"},
     "nodes": [{"change" ("removed"|"added"|"rewired"), "name", "op", "module", "layer",
                "inputs_before": [str], "inputs_after": [str]}]}
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx

from ic_compile.passes.graph_ops import (LAYOUT_OPS, example_value, is_parameter, layer_number, module_path,
                                         op_name, shape_of, tensor_args)

from ..plan import PlanError
from ..rewrite import NoIndexerFoundError, RewriteResult, rewrite

SCHEMA_VERSION = 1
PROJECTION_OPS = {"linear", "matmul", "mm", "bmm", "einsum", "addmm"}


@dataclass
class LayerDiff:
    layer: int
    role: str
    source: int
    module: str
    heads: int
    head_dim: int
    indexer_flops: int  # this layer's indexer at seq_len (what an F layer pays)
    flops_removed: int
    removed_nodes: int
    rewired_nodes: int
    weight_bytes_freed: int
    freed_parameters: list[str]
    key_cache_bytes_per_token_freed: int
    key_cache_write_removed: bool | None


@dataclass
class NodeChange:
    change: str  # "removed" | "added" | "rewired"
    name: str
    op: str
    module: str
    layer: int | None  # None: shared by several layers / outside them / the graph output (see attribution)
    inputs_before: list[str] = field(default_factory=list)
    inputs_after: list[str] = field(default_factory=list)
    attribution: str = ""  # how `layer` was found, or why there is none


@dataclass
class GraphDiff:
    plan: str
    seq_len: int
    nodes_before: int
    nodes_after: int
    layers: list[LayerDiff]
    nodes: list[NodeChange]
    result: RewriteResult | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)  # caveats of the counts (e.g. no key cache in the graph)

    # ---------------------------------------------------------------- views
    @property
    def totals(self) -> dict:
        full = sum(l.indexer_flops for l in self.layers)
        removed = sum(l.flops_removed for l in self.layers)
        count = lambda kind: sum(n.change == kind for n in self.nodes)  # noqa: E731
        return {"indexer_flops": full, "flops_removed": removed,
                "flops_removed_fraction": removed / full if full else 0.0,
                "removed_nodes": count("removed"), "rewired_nodes": count("rewired"),
                "added_nodes": count("added"),
                "weight_bytes_freed": sum(l.weight_bytes_freed for l in self.layers),
                "key_cache_bytes_per_token_freed": sum(l.key_cache_bytes_per_token_freed for l in self.layers)}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "plan": self.plan, "seq_len": self.seq_len,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "layers": [asdict(l) for l in self.layers], "totals": self.totals,
                "nodes": [asdict(n) for n in self.nodes], "notes": list(self.notes)}

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def __str__(self) -> str:
        t = self.totals
        lines = [f"indexcache graph diff — plan {self.plan}, seq_len {self.seq_len}: "
                 f"{self.nodes_before} -> {self.nodes_after} nodes "
                 f"({t['removed_nodes']} removed, {t['rewired_nodes']} rewired, {t['added_nodes']} added)",
                 f"{'layer':>5} {'role':>4} {'src':>3} {'H×D':>7} {'indexer FLOPs':>14} {'FLOPs removed':>14} "
                 f"{'nodes -':>7} {'rewired':>7} {'weights freed':>13} {'kcache B/tok':>12}  module"]
        for l in self.layers:
            lines.append(f"{l.layer:>5} {l.role:>4} {l.source:>3} {f'{l.heads}×{l.head_dim}':>7} "
                         f"{_si(l.indexer_flops):>14} {_si(l.flops_removed):>14} {l.removed_nodes:>7} "
                         f"{l.rewired_nodes:>7} {_bytes(l.weight_bytes_freed):>13} "
                         f"{l.key_cache_bytes_per_token_freed:>12}  {l.module}")
        lines.append(f"{'total':>5} {'':>4} {'':>3} {'':>7} {_si(t['indexer_flops']):>14} "
                     f"{_si(t['flops_removed']):>14} {t['removed_nodes']:>7} {t['rewired_nodes']:>7} "
                     f"{_bytes(t['weight_bytes_freed']):>13} {t['key_cache_bytes_per_token_freed']:>12}  "
                     f"({100 * t['flops_removed_fraction']:.1f}% of indexer FLOPs removed)")
        rewired = [n for n in self.nodes if n.change in ("rewired", "added")]
        if rewired:
            lines.append("rewired / added nodes:")
            layer_of = node_layers(self.result.original) if self.result is not None else {}
            named = lambda names: ", ".join(  # noqa: E731
                f"{x} (layer {layer_of[x]})" if layer_of.get(x) is not None else x for x in names) or "-"
            for n in rewired:
                gained = [x for x in n.inputs_after if x not in n.inputs_before]
                lost = [x for x in n.inputs_before if x not in n.inputs_after]
                where = f"layer {n.layer}" if n.layer is not None else n.attribution
                lines.append(f"  {n.change:8} {n.name} ({n.op}, {where}): reads {named(gained)}"
                             + (f" instead of {named(lost)}" if n.change == "rewired" else ""))
        shared = [n for n in self.nodes if n.layer is None and n.change == "removed"]
        if shared:
            lines.append(f"removed nodes of no single layer: {len(shared)} ("
                         + "; ".join(sorted({n.attribution for n in shared})) + ")")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_html(self, path=None) -> str:
        text = render_html(self)
        if path is not None:
            Path(path).write_text(text)
        return text


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def _bytes(x: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} B"


# ------------------------------------------------------------------------ building the diff
DIFF_STAGES = ["capture (Dynamo)", "rewrite for the plan", "count"]


class _NoStages:
    @contextlib.contextmanager
    def step(self, _name: str):
        yield


def graph_diff(model, example_inputs, plan=None, seq_len: int | None = None, *, kernels: bool = False,
               progress=None, **kwargs) -> GraphDiff:
    """Capture the model's Dynamo graph, apply `plan`, and describe what changed.
    kernels=True also lowers F indexers to `ic::indexer_topk` (what the backend does on CUDA): their
    nodes show as removed and the fused op as added (F layers' FLOPs are moved, not removed).
    progress: a `cli.Stages` over DIFF_STAGES (the CLI's bar)."""
    from .explain import capture_graphs
    stages = progress or _NoStages()
    with stages.step("capture (Dynamo)"):
        graphs = capture_graphs(model, example_inputs, **kwargs)
    with stages.step("rewrite for the plan"):
        results = [rewrite(gm, plan, strict=True, kernels=kernels) for gm in graphs]
    found = [r for r in results if r.detection.matches]
    if not found:
        raise NoIndexerFoundError(f"graph diff: no lightning indexer found in the model's {len(graphs)} "
                                  "graph(s); is this a DSA model? Without an indexer the plan changes nothing")
    if len(found) > 1:
        raise PlanError(f"the model was split into {len(graphs)} graphs with indexers in {len(found)} of them "
                        "(graph breaks); a plan must see all layers in one graph")
    with stages.step("count"):
        return diff_rewrite(found[0], seq_len)


def diff_rewrite(result: RewriteResult, seq_len: int | None = None) -> GraphDiff:
    """The diff of one RewriteResult (`rewrite(gm, plan)`)."""
    before = {n.name: n for n in result.original.graph.nodes}
    after = {n.name: n for n in result.gm.graph.nodes}
    first = result.bindings[0].match
    topk_in = before[first.topk.name].args[0]
    if seq_len is None:
        seq_len = int((shape_of(topk_in) or (0,))[-1])
    layer_of, why = attribute_layers(result.original)
    changes = _node_changes(result, before, after, layer_of, why)
    removed_names = {c.name for c in changes if c.change == "removed"}
    dropped = key_cache_writes_removed(result)
    layers = []
    for b in result.bindings:
        m = b.match
        heads, dim = _heads_and_dim(before[m.query.name], before[m.topk.name].args[0])
        indexer_nodes = _indexer_nodes(result.original, m, removed_names, layer_of)
        own_removed = [before[c.name] for c in changes if c.change == "removed" and c.layer == m.layer]
        freed = _freed_parameters(result.original, after, own_removed)
        is_s = b.role == "S"
        layers.append(LayerDiff(
            layer=m.layer, role=b.role, source=b.source.layer, module=m.module, heads=heads, head_dim=dim,
            indexer_flops=_flops(indexer_nodes, m, seq_len, heads, dim),
            flops_removed=_flops(own_removed, m, seq_len, heads, dim) if is_s else 0,
            removed_nodes=len(own_removed),
            rewired_nodes=sum(c.change == "rewired" and c.layer == m.layer for c in changes),
            weight_bytes_freed=sum(_nbytes(p) for p in freed), freed_parameters=[parameter_path(p) for p in freed],
            key_cache_bytes_per_token_freed=(dim * _key_itemsize(before[m.key.name])
                                             if is_s and dropped.get(m.layer) else 0),
            key_cache_write_removed=dropped.get(m.layer) if is_s else None))
    return GraphDiff(plan=str(result.plan), seq_len=seq_len, nodes_after=len(after),
                     nodes_before=len(after) + sum(c.change == "removed" for c in changes),
                     layers=layers, nodes=changes, result=result, notes=key_cache_notes(dropped))


def key_cache_writes_removed(result: RewriteResult) -> dict[int, bool | None]:
    """S layer -> True if every write of its indexer key cache (the cache append, or the in-place writes
    into a static buffer) found in the original graph is absent from the rewritten one, False if any is
    still there, None if the original graph writes no such cache (e.g. captured without a cache).
    Counted from the graphs, not from what the pass believes it did."""
    after = {n.name for n in result.gm.graph.nodes}
    caches = {c.layer: c for c in result.caches}
    counted: dict[int, bool | None] = {}
    for b in result.bindings:
        if b.role != "S":
            continue
        cache = caches.get(b.match.layer)
        writes = ([] if cache is None else [cache.concat.name] if cache.concat is not None
                  else [w.name for w in cache.writers])
        counted[b.match.layer] = None if not writes else not any(w in after for w in writes)
    return counted


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


def node_layers(gm: fx.GraphModule) -> dict[str, int | None]:
    """Layer of every node (None: shared by several layers or outside them); see `attribute_layers`."""
    return attribute_layers(gm)[0]


def attribute_layers(gm: fx.GraphModule) -> tuple[dict[str, int | None], dict[str, str]]:
    """(layer, why) of every node. In order of trust:
    - the innermost entry of its nn_module_stack under a numbered layer (a helper function such as HF
      DeepSeek-V3.2's `apply_rotary_pos_emb` is the innermost entry; the layer is the one above it);
    - else the single layer all its users belong to (parameters, graph inputs, helper values);
    - else None, with the reason: read by several layers, the graph output, outside every layer."""
    nodes = list(gm.graph.nodes)
    layers: dict[str, int | None] = {n.name: _stack_layer(n) for n in nodes}
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


def _stack_layer(node: fx.Node) -> int | None:
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    stack = node.meta.get("nn_module_stack") or {}
    for entry in reversed(list(stack.values())):
        path = _clean_path(entry[0])
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


def _node_changes(result, before, after, layer_of, why) -> list[NodeChange]:
    changes = []
    removed_by_rewrite = {r.name for r in result.removed}
    for name, node in before.items():
        if name not in after:
            if name in removed_by_rewrite:  # (nodes dead before the rewrite are not its doing)
                changes.append(NodeChange("removed", name, op_name(node) or str(node.target), module_path(node),
                                          layer_of[name], [a.name for a in tensor_args(node)], [], why[name]))
            continue
        old, new = [a.name for a in tensor_args(node)], [a.name for a in tensor_args(after[name])]
        if old != new:
            changes.append(NodeChange("rewired", name, op_name(node) or node.op, module_path(node),
                                      layer_of[name], old, new, why[name]))
    added_layers, added_why = attribute_layers(result.gm)
    for name, node in after.items():
        if name not in before:
            changes.append(NodeChange("added", name, op_name(node) or str(node.target), module_path(node),
                                      added_layers[name], [], [a.name for a in tensor_args(node)], added_why[name]))
    return changes


def _heads_and_dim(query: fx.Node, scores: fx.Node) -> tuple[int, int]:
    """D = the query's last dim (contracted with the key); H = numel(q) / (B·S·D), B·S = numel(scores) / T."""
    q_shape, s_shape = shape_of(query), shape_of(scores)
    if not q_shape or not s_shape:
        raise PlanError(f"indexer query {query.name!r} has no shape metadata; cannot count FLOPs")
    dim = int(q_shape[-1])
    rows = math.prod(int(s) for s in s_shape[:-1])
    return int(math.prod(int(s) for s in q_shape) // (rows * dim)), dim


def _indexer_nodes(gm, match, removed_names, layer_of) -> list[fx.Node]:
    """The nodes of this layer's indexer: under its module path, else (no module info) the removed ones."""
    if match.module:
        return [n for n in gm.graph.nodes if module_path(n) == match.module
                or module_path(n).startswith(match.module + ".")]
    return [n for n in gm.graph.nodes if n.name in removed_names and layer_of[n.name] == match.layer]


def _weight_of(node: fx.Node) -> fx.Node | None:
    for arg in tensor_args(node):
        seen = arg
        for _ in range(6):
            if is_parameter(seen):
                return seen
            if op_name(seen) not in LAYOUT_OPS or not tensor_args(seen):
                break
            seen = tensor_args(seen)[0]
    return None


def _flops(nodes, match, seq_len: int, heads: int, dim: int) -> int:
    total = 0
    for node in nodes:
        if node.name == match.product.name:
            total += seq_len * seq_len * heads * dim  # causal: L²/2 · H · D · 2
        elif op_name(node) in PROJECTION_OPS:
            weight = _weight_of(node)
            value = example_value(weight) if weight is not None else None
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                total += 2 * seq_len * value.numel()
    return total


def _freed_parameters(original: fx.GraphModule, after: dict, removed: list[fx.Node]) -> list[fx.Node]:
    removed_set = {n.name for n in removed}
    freed = []
    for node in original.graph.nodes:
        if not is_parameter(node) or not node.users:
            continue
        if all(u.name in removed_set for u in node.users):
            freed.append(node)
    return freed


def parameter_path(node: fx.Node) -> str:
    """'model.layers.1.self_attn.indexer.wq_b.weight' from Dynamo's lifted placeholder name
    ('l_self_modules_model_modules_layers_modules_1_..._parameters_weight_'); get_attr: its target."""
    if node.op == "get_attr":
        return str(node.target)
    name = re.sub(r"^l_(self_)?", "", node.name).rstrip("_")
    return re.sub(r"(?:^|_)(?:modules|parameters|buffers)_", ".", name).strip(".")


def _nbytes(node: fx.Node) -> int:
    value = example_value(node)
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _key_itemsize(key: fx.Node) -> int:
    """Element size of the key as stored (before any fp32 upcast for the score)."""
    node = key
    for _ in range(16):
        if op_name(node) not in LAYOUT_OPS or not tensor_args(node):
            break
        node = tensor_args(node)[0]
    value = example_value(node)
    value = value if isinstance(value, torch.Tensor) else example_value(key)
    return value.element_size() if isinstance(value, torch.Tensor) else 4


# ------------------------------------------------------------------------ HTML
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 132, 24, 14, 30, 20


def _layout(graph) -> dict:
    """DAG-layered layout: rows = networkx topological generations of the non-source nodes (top to
    bottom); each source (parameter, graph input, value from another layer) sits in the row just above
    its first reader; columns ordered by the barycentre of the predecessors."""
    import networkx as nx
    sources = {n for n in graph if graph.in_degree(n) == 0 and graph.out_degree(n) > 0}
    inner = graph.subgraph([n for n in graph if n not in sources])
    row_of = {}
    for row, generation in enumerate(nx.topological_generations(inner)):
        for n in generation:
            row_of[n] = row + 1
    for n in sources:
        row_of[n] = min(row_of[u] for u in graph.successors(n)) - 1
    rows: dict[int, list] = {}
    for n, r in row_of.items():
        rows.setdefault(r, []).append(n)
    pos, x_of = {}, {}
    for r in sorted(rows):
        def bary(n):
            near = [x_of[p] for p in graph.predecessors(n) if p in x_of]
            return (sum(near) / len(near) if near else 0.0, graph.nodes[n]["order"])
        taken = set()
        for n in sorted(rows[r], key=bary):
            want = max(0, round(bary(n)[0]))
            col = want
            while col in taken:
                col += 1
            taken.add(col)
            x_of[n] = col
            pos[n] = (col, r - min(rows))
    return pos


def _layer_graph(diff: GraphDiff, layer, layer_of, status) -> "object":
    """networkx DiGraph of one layer's nodes (before ∪ after) plus ghost nodes for inputs from elsewhere."""
    import networkx as nx
    result = diff.result
    before = {n.name: n for n in result.original.graph.nodes}
    after = {n.name: n for n in result.gm.graph.nodes}
    order = {name: i for i, name in enumerate(list(before) + [n for n in after if n not in before])}
    dead = {n for n in before if n not in after and n not in status}  # dead before the rewrite
    members = [name for name in order
               if name not in dead and _layer_key(layer_of.get(name, _added_layer(after, name))) == layer
               and (before.get(name) or after.get(name)).op not in ("output",)]
    graph = nx.DiGraph()
    for name in members:
        node = before.get(name) or after[name]
        graph.add_node(name, order=order[name], op=_label_op(node), status=status.get(name, "kept"),
                       module=module_path(node), ghost=False, shape=str(list(shape_of(node) or [])))
    for name in members:
        old = [a.name for a in tensor_args(before[name])] if name in before else []
        new = [a.name for a in tensor_args(after[name])] if name in after else []
        for src in dict.fromkeys(old + new):
            if src not in graph:
                node = before.get(src) or after[src]
                if node.op == "placeholder" and not is_parameter(node) and layer_of.get(src) is None:
                    pass  # graph input: shown as a ghost too
                graph.add_node(src, order=order.get(src, 0), op=_label_op(node), status="ghost",
                               module=module_path(node), ghost=True, shape=str(list(shape_of(node) or [])),
                               ghost_layer=layer_of.get(src))
            kind = ("kept" if src in old and src in new else "removed" if src in old else "added")
            if status.get(name) == "removed":
                kind = "removed"
            graph.add_edge(src, name, kind=kind)
    return graph


def _added_layer(after, name):
    node = after.get(name)
    return layer_number(module_path(node)) if node is not None else None


def _layer_key(layer) -> str:
    return "other" if layer is None else str(layer)


def _label_op(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        if not is_parameter(node):
            return "input"
        return ".".join(parameter_path(node).split(".")[-2:])
    return op_name(node) or node.op


def render_html(diff: GraphDiff) -> str:
    if diff.result is None:
        raise ValueError("this GraphDiff has no rewrite result attached (built from JSON?); cannot draw it")
    layer_of = node_layers(diff.result.original)
    status = {c.name: c.change for c in diff.nodes}
    for layer in diff.layers:
        for p in layer.freed_parameters:
            status[p] = "freed"
    roles = {str(l.layer): l for l in diff.layers}
    keys = sorted({_layer_key(v) for v in layer_of.values()} | set(roles),
                  key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    sections = []
    for key in keys:
        graph = _layer_graph(diff, key, layer_of, status)
        if graph.number_of_nodes() == 0:
            continue
        sections.append(_svg_section(key, graph, roles.get(key)))
    t = diff.totals
    rows = "".join(
        f"<tr data-layer='{l.layer}' class='role{l.role}'><td>{l.layer}</td><td>{l.role}</td><td>{l.source}</td>"
        f"<td>{l.heads}×{l.head_dim}</td><td>{_si(l.indexer_flops)}</td><td>{_si(l.flops_removed)}</td>"
        f"<td>{l.removed_nodes}</td><td>{l.rewired_nodes}</td><td>{_bytes(l.weight_bytes_freed)}</td>"
        f"<td>{l.key_cache_bytes_per_token_freed}</td><td>{html.escape(l.module)}</td></tr>" for l in diff.layers)
    changes = "".join(
        f"<tr data-layer='{_layer_key(c.layer)}' class='c{c.change}'><td>{c.change}</td><td>{_layer_key(c.layer)}</td>"
        f"<td>{html.escape(c.name)}</td><td>{html.escape(c.op)}</td><td>{html.escape(', '.join(c.inputs_before))}</td>"
        f"<td>{html.escape(', '.join(c.inputs_after))}</td><td>{html.escape(c.module)}</td></tr>" for c in diff.nodes)
    def option(k):
        role = ""
        if k in roles:
            role = f" ({roles[k].role}" + (f" ← {roles[k].source}" if roles[k].role == "S" else "") + ")"
        return f"<option value='{k}'>{'layer ' + k if k != 'other' else 'outside layers'}{role}</option>"
    options = "".join(option(k) for k in keys)
    first_s = next((str(l.layer) for l in diff.layers if l.role == "S"), keys[0])
    data = html.escape(json.dumps({k: v for k, v in diff.to_dict().items() if k != "nodes"}))
    return _PAGE.format(plan=html.escape(diff.plan), seq=diff.seq_len, before=diff.nodes_before,
                        after=diff.nodes_after, removed=t["removed_nodes"], rewired=t["rewired_nodes"],
                        added=t["added_nodes"], flops=_si(t["flops_removed"]), flops_all=_si(t["indexer_flops"]),
                        frac=f"{100 * t['flops_removed_fraction']:.1f}", wbytes=_bytes(t["weight_bytes_freed"]),
                        kbytes=t["key_cache_bytes_per_token_freed"], rows=rows, changes=changes,
                        options=options, sections="".join(sections), first=first_s, data=data,
                        css=_CSS, js=_JS)


def _svg_section(key: str, graph, layer: LayerDiff | None) -> str:
    pos = _layout(graph)
    width = (max(x for x, _ in pos.values()) + 1) * (BOX_W + GAP_X) + 2 * MARGIN
    height = (max(y for _, y in pos.values()) + 1) * (BOX_H + GAP_Y) + 2 * MARGIN
    xy = {n: (MARGIN + x * (BOX_W + GAP_X), MARGIN + y * (BOX_H + GAP_Y)) for n, (x, y) in pos.items()}
    parts = []
    for src, dst, attrs in graph.edges(data=True):
        (x1, y1), (x2, y2) = xy[src], xy[dst]
        x1, y1, x2, y2 = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2, y2
        mid = (y1 + y2) / 2
        parts.append(f"<path class='e {attrs['kind']}' data-src='{src}' data-dst='{dst}' "
                     f"d='M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}'/>")
    for name, attrs in graph.nodes(data=True):
        x, y = xy[name]
        ghost_layer = attrs.get("ghost_layer")
        label = attrs["op"] if not attrs["ghost"] else (
            f"{attrs['op']} ← L{ghost_layer}" if ghost_layer is not None else f"{attrs['op']} ← outside")
        tip = (f"{name}\nop: {attrs['op']}\nstatus: {attrs['status']}\nshape: {attrs['shape']}\n"
               f"module: {attrs['module']}")
        parts.append(f"<g class='n {attrs['status']}' data-name='{html.escape(name)}' transform='translate({x},{y})'>"
                     f"<title>{html.escape(tip)}</title><rect width='{BOX_W}' height='{BOX_H}' rx='5'/>"
                     f"<text x='{BOX_W / 2}' y='{BOX_H / 2 + 4}'>{html.escape(_short(label, 20))}</text></g>")
    title = (f"Layer {key} — {layer.role}" + (f", reuses layer {layer.source}'s top-k" if layer.role == "S" else
                                              ", runs its indexer") if layer else
             (f"Layer {key} — no indexer" if key != "other" else "Outside the layers (embedding, head, ...)"))
    stats = (f" · {layer.removed_nodes} nodes removed, {layer.rewired_nodes} rewired, "
             f"{_si(layer.flops_removed)} FLOPs removed" if layer else "")
    return (f"<section class='layer' data-layer='{key}'><h2>{html.escape(title)}<small>{stats} · "
            f"{graph.number_of_nodes()} nodes</small></h2><div class='scroll'><svg width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg></div></section>")


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 22px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1e0}main{padding:14px 22px}
.controls{position:sticky;top:0;z-index:5;background:#f6f7f9;padding:8px 0;border-bottom:1px solid #dde1e8;
 display:flex;gap:18px;align-items:center;flex-wrap:wrap}
select{font-size:14px;padding:3px 6px}
table{border-collapse:collapse;background:#fff;margin:8px 0 14px}
td,th{border:1px solid #dde1e8;padding:3px 8px;text-align:right;white-space:nowrap}
td:last-child{text-align:left}th{background:#eef0f4}
tr.roleS td:nth-child(2){color:#c0392b;font-weight:600}tr.roleF td:nth-child(2){color:#1f6feb;font-weight:600}
.legend span{display:inline-flex;align-items:center;gap:5px;margin-right:12px}
.legend i{display:inline-block;width:22px;height:13px;border-radius:3px;border:1.5px solid}
.k{background:#fff;border-color:#9aa3b2}.r{background:#fde2e0;border-color:#c0392b}
.w{background:#fff1d6;border-color:#e08a00}.a{background:#dcf5e3;border-color:#1e8e3e}
.f{background:#f3e5ff;border-color:#8e44ad}.g{background:#f0f1f4;border-color:#9aa3b2;border-style:dashed}
h2{font-size:16px;margin:16px 0 6px}h2 small{font-weight:400;color:#5b6576;margin-left:8px}
.scroll{overflow:auto;max-height:78vh;background:#fff;border:1px solid #dde1e8}
svg text{font:11px ui-monospace,SFMono-Regular,Menlo,monospace;text-anchor:middle;fill:#1d2330}
.n rect{fill:#fff;stroke:#9aa3b2;stroke-width:1.2}
.n.removed rect{fill:#fde2e0;stroke:#c0392b;stroke-dasharray:4 2}.n.removed text{fill:#a02a1e;text-decoration:line-through}
.n.rewired rect{fill:#fff1d6;stroke:#e08a00;stroke-width:2}.n.added rect{fill:#dcf5e3;stroke:#1e8e3e;stroke-width:2}
.n.freed rect{fill:#f3e5ff;stroke:#8e44ad;stroke-dasharray:4 2}
.n.ghost rect{fill:#f0f1f4;stroke:#9aa3b2;stroke-dasharray:3 3}.n.ghost text{fill:#5b6576}
.e{fill:none;stroke:#b3bac6;stroke-width:1}.e.removed{stroke:#e3a39c;stroke-dasharray:4 3}
.e.added{stroke:#e08a00;stroke-width:2.4}
.changed-only .n.kept,.changed-only .n.ghost{opacity:.12}.changed-only .e.kept{opacity:.1}
details{margin:8px 0}summary{cursor:pointer;font-weight:600}
"""

_JS = """
const sel=document.getElementById('layer'),only=document.getElementById('only');
function apply(){const v=sel.value;
 document.querySelectorAll('section.layer').forEach(s=>s.style.display=(v==='all'||s.dataset.layer===v)?'':'none');
 document.querySelectorAll('#changes tbody tr').forEach(r=>r.style.display=(v==='all'||r.dataset.layer===v)?'':'none');
 document.body.classList.toggle('changed-only',only.checked);location.hash=v;
 document.querySelectorAll('section.layer').forEach(s=>{if(s.style.display==='none')return;
  const box=s.querySelector('.scroll'),n=s.querySelector('.n.rewired,.n.added')||s.querySelector('.n.removed');
  if(n){const t=n.transform.baseVal.consolidate().matrix;box.scrollTop=Math.max(0,t.f-box.clientHeight*0.45);
   box.scrollLeft=Math.max(0,t.e-box.clientWidth/2);}});}
sel.addEventListener('change',apply);only.addEventListener('change',apply);
const h=decodeURIComponent(location.hash.slice(1));if(h&&[...sel.options].some(o=>o.value===h))sel.value=h;apply();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>indexcache graph diff — plan {plan}</title>
<style>{css}</style></head><body>
<header><h1>IndexCache graph diff — plan <code>{plan}</code></h1>
<p>{before} → {after} graph nodes: {removed} removed, {rewired} rewired, {added} added ·
indexer FLOPs removed at L={seq}: {flops} of {flops_all} ({frac}%) · indexer weights freed: {wbytes} ·
indexer key cache freed: {kbytes} B/token</p></header>
<main>
<table><thead><tr><th>layer</th><th>role</th><th>source</th><th>H×D</th><th>indexer FLOPs</th>
<th>FLOPs removed</th><th>nodes removed</th><th>rewired</th><th>weights freed</th><th>key cache B/token freed</th>
<th>indexer module</th></tr></thead><tbody>{rows}</tbody></table>
<div class="controls"><label>Show <select id="layer"><option value="all">all layers</option>{options}</select></label>
<label><input type="checkbox" id="only"> fade unchanged nodes</label>
<span class="legend"><span><i class="k"></i>kept</span><span><i class="r"></i>removed</span>
<span><i class="w"></i>rewired (reads a new input: another layer's top-k, a fused op)</span><span><i class="a"></i>added</span>
<span><i class="f"></i>parameter freed</span><span><i class="g"></i>from another layer</span></span></div>
{sections}
<details id="changes"><summary>Node-level diff ({removed} removed, {rewired} rewired, {added} added)</summary>
<table><thead><tr><th>change</th><th>layer</th><th>node</th><th>op</th><th>inputs before</th><th>inputs after</th>
<th>module</th></tr></thead><tbody>{changes}</tbody></table></details>
<script type="application/json" id="diff-data">{data}</script>
</main><script>{js}
if(!location.hash){{sel.value='{first}';apply();}}</script></body></html>
"""


# ------------------------------------------------------------------------ CLI
def register_cli(subparsers) -> None:
    from ..cli import add_cache_argument, add_model_arguments, examples, positive_int
    parser = subparsers.add_parser(
        "diff", help="per-layer graph diff of the rewrite: removed nodes, FLOPs, bytes",
        description="Apply --plan to the model's Dynamo graph and count, per indexer layer, the nodes "
                    "removed / rewired and the indexer FLOPs, weights and key-cache bytes that no longer run.",
        epilog=examples("ic diff --model dsa:tiny --plan FSSF --seq 24 --seq-len 1024",
                        "ic diff --model hf-tiny:deepseek_v32 --plan FSFS --json > diff.json",
                        "ic diff --model hf-tiny:glm_moe_dsa --plan FSFS --html diff.html"))
    add_model_arguments(parser)
    parser.add_argument("--plan", required=True, help="pattern (FSSF...) or plan.json")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length the FLOPs are counted at (default: --seq)")
    parser.add_argument("--kernels", action="store_true",
                        help="also lower F indexers to ic::indexer_topk (as the backend does on CUDA)")
    add_cache_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the diff as JSON")
    parser.add_argument("--html", default=None, help="write the interactive graph page here (checked first)")
    parser.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    from ..cli import Stages, example_ids, forward_inputs, print_json
    from ..outputs import output_file
    from .models import load_model
    if args.html:
        output_file(args.html, "--html")
    names = ["load model"] + DIFF_STAGES + (["write HTML"] if args.html else [])
    with Stages(names, "ic diff") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed)
            inputs = forward_inputs(model, example_ids(model, args), args.with_cache)
        diff = graph_diff(model, inputs, plan=args.plan, seq_len=args.seq_len, kernels=args.kernels,
                          progress=stages)
        if args.html:
            with stages.step("write HTML"):
                diff.to_html(args.html)
    print_json(diff.to_dict()) if args.json else print(diff)
    if args.html and not args.json:
        print(f"wrote {args.html}")
    return 0


__all__ = ["GraphDiff", "LayerDiff", "NodeChange", "SCHEMA_VERSION", "diff_rewrite", "graph_diff", "node_layers"]
