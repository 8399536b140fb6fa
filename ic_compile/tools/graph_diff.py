"""`ic diff` / `graph_diff(model, example_inputs, plan=...)`: what the IndexCache rewrite did, per layer.

For every indexer layer: its role and source F layer, the graph nodes removed / rewired, and what the
plan saves — indexer FLOPs at a sequence length, indexer weight bytes no longer read, indexer key-cache
bytes per token no longer written — plus the node-level diff. Three views: `str(diff)` (terminal
table), `diff.to_dict()` (JSON, schema below) and `diff.to_html(path)` (one self-contained page with
the annotated graph, filterable by layer: ic_compile.tools.graph_diff_html). Which layer a node belongs
to is decided by ic_compile.tools.attribution (shared with `explain`).

Graph breaks: a model captured as several graphs has each graph holding indexers rewritten as the
backend binds it (a fragment; S layers whose F source is in another graph read its top-k from the
index store, so their indexer is removed there too). Each fragment is diffed on its own
(`diff.fragments`, one GraphDiff each) and the model's diff is their union: layers and node changes
of every fragment, node counts summed; the JSON gains "fragments" (below), the HTML one section per
layer drawn from its fragment.

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
                "inputs_before": [str], "inputs_after": [str]}],
     only with graph breaks: "fragments": [{"graph" (index among the captured graphs), "frame" (module
                path of its frame), "layers": [int], "nodes_before", "nodes_after", "removed_nodes",
                "rewired_nodes", "added_nodes"}]}
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import fx

from ic_compile.passes.graph_ops import (LAYOUT_OPS, example_value, full_module_path, is_parameter, op_name, shape_of,
                                         tensor_args)

from ..capture import capture, indexer_results, rewrite_graphs, source_layers
from ..plan import PlanError
from ..rewrite import RewriteResult
from .attribution import (attribute_layers, frame_prefix, key_cache_notes,  # noqa: F401 (re-exported)
                          key_cache_writes_removed, node_layers, parameter_path)
from .graph_diff_html import format_bytes, format_si, render_html

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
    fragments: list[GraphDiff] = field(default_factory=list, repr=False)  # graph breaks: one diff per fragment
    graph: int | None = None  # a fragment's index among the captured graphs

    @property
    def parts(self) -> list[GraphDiff]:
        """The diffs of single graphs this one is made of: its fragments, else itself."""
        return self.fragments or [self]

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
        data = {"schema_version": SCHEMA_VERSION, "plan": self.plan, "seq_len": self.seq_len,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "layers": [asdict(l) for l in self.layers], "totals": self.totals,
                "nodes": [asdict(n) for n in self.nodes], "notes": list(self.notes)}
        if self.fragments:
            data["fragments"] = [_fragment_entry(f) for f in self.fragments]
        return data

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
                         f"{format_si(l.indexer_flops):>14} {format_si(l.flops_removed):>14} {l.removed_nodes:>7} "
                         f"{l.rewired_nodes:>7} {format_bytes(l.weight_bytes_freed):>13} "
                         f"{l.key_cache_bytes_per_token_freed:>12}  {l.module}")
        lines.append(f"{'total':>5} {'':>4} {'':>3} {'':>7} {format_si(t['indexer_flops']):>14} "
                     f"{format_si(t['flops_removed']):>14} {t['removed_nodes']:>7} {t['rewired_nodes']:>7} "
                     f"{format_bytes(t['weight_bytes_freed']):>13} {t['key_cache_bytes_per_token_freed']:>12}  "
                     f"({100 * t['flops_removed_fraction']:.1f}% of indexer FLOPs removed)")
        if any(n.change in ("rewired", "added") for n in self.nodes):
            lines.append("rewired / added nodes:")
            for part in self.parts:
                lines += _rewired_lines(part, fragment=bool(self.fragments))
        shared = [n for n in self.nodes if n.layer is None and n.change == "removed"]
        if shared:
            lines.append(f"removed nodes of no single layer: {len(shared)} ("
                         + "; ".join(sorted({n.attribution for n in shared})) + ")")
        if self.fragments:
            lines.append(f"graph breaks: {len(self.fragments)} graphs hold indexers, each diffed as the backend "
                         "binds it (S layers whose F source is in another graph read its top-k from the index store):")
            lines += [f"  graph {f.graph} (frame {frame_prefix(f.result) or '<model>'}): layers "
                      f"{[l.layer for l in f.layers]}, {f.nodes_before} -> {f.nodes_after} nodes"
                      for f in self.fragments]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_html(self, path=None) -> str:
        text = render_html(self)
        if path is not None:
            Path(path).write_text(text)
        return text


def _rewired_lines(part: GraphDiff, fragment: bool) -> list[str]:
    """The rewired / added nodes of one graph's diff, their new inputs named with their layer."""
    layer_of = node_layers(part.result.original, frame_prefix(part.result)) if part.result is not None else {}
    named = lambda names: ", ".join(  # noqa: E731
        f"{x} (layer {layer_of[x]})" if layer_of.get(x) is not None else x for x in names) or "-"
    lines = []
    for n in part.nodes:
        if n.change not in ("rewired", "added"):
            continue
        gained = [x for x in n.inputs_after if x not in n.inputs_before]
        lost = [x for x in n.inputs_before if x not in n.inputs_after]
        where = (f"layer {n.layer}" if n.layer is not None else n.attribution) + (
            f", graph {part.graph}" if fragment else "")
        lines.append(f"  {n.change:8} {n.name} ({n.op}, {where}): reads {named(gained)}"
                     + (f" instead of {named(lost)}" if n.change == "rewired" else ""))
    return lines


def _fragment_entry(part: GraphDiff) -> dict:
    t = part.totals
    return {"graph": part.graph, "frame": frame_prefix(part.result), "layers": [l.layer for l in part.layers],
            "nodes_before": part.nodes_before, "nodes_after": part.nodes_after,
            **{k: t[k] for k in ("removed_nodes", "rewired_nodes", "added_nodes")}}


# ------------------------------------------------------------------------ building the diff
DIFF_STAGES = ["capture (Dynamo)", "rewrite for the plan", "count"]


def graph_diff(model, example_inputs, plan=None, seq_len: int | None = None, *, kernels: bool = False,
               progress=None, **kwargs) -> GraphDiff:
    """Capture the model's Dynamo graph, apply `plan`, and describe what changed.
    kernels=True also lowers F indexers to `ic::indexer_topk` (what the backend does on CUDA): their
    nodes show as removed and the fused op as added (F layers' FLOPs are moved, not removed).
    progress: anything with a `step(name)` context manager, called for each of DIFF_STAGES (the CLI passes
    its bar, `ic_compile.cli.progress.Stages`)."""
    with _step(progress, "capture (Dynamo)"):
        recorder = capture(model, example_inputs, **kwargs)
    with _step(progress, "rewrite for the plan"):
        results = rewrite_graphs(recorder, plan, strict=True, kernels=kernels)
    found = indexer_results(results, "graph diff", "is this a DSA model? Without an indexer the plan changes nothing")
    with _step(progress, "count"):
        if found[0].fragment is None:
            return diff_rewrite(found[0], seq_len)
        sources = source_layers(found)
        seq_len = seq_len if seq_len is not None else _indexed_length(found[0])
        return merge_diffs([diff_rewrite(r, seq_len, sources, graph=results.index(r)) for r in found])


def _step(progress, name: str):
    return progress.step(name) if progress is not None else contextlib.nullcontext()


def merge_diffs(fragments: list[GraphDiff]) -> GraphDiff:
    """The model's diff from its fragments' (graph breaks): their layers and node changes, counts summed."""
    dropped = {}
    for f in fragments:
        dropped.update(key_cache_writes_removed(f.result))
    return GraphDiff(plan=fragments[0].plan, seq_len=fragments[0].seq_len,
                     nodes_before=sum(f.nodes_before for f in fragments),
                     nodes_after=sum(f.nodes_after for f in fragments),
                     layers=sorted((l for f in fragments for l in f.layers), key=lambda l: l.layer),
                     nodes=[n for f in fragments for n in f.nodes], notes=key_cache_notes(dropped), fragments=fragments)


def _indexed_length(result: RewriteResult) -> int:
    """The key length the first indexer ranks (the default seq_len FLOPs are counted at)."""
    before = {n.name: n for n in result.original.graph.nodes}
    topk_in = before[result.bindings[0].match.topk.name].args[0]
    return int((shape_of(topk_in) or (0,))[-1])


def diff_rewrite(result: RewriteResult, seq_len: int | None = None, sources: dict[int, int] | None = None,
                 graph: int | None = None) -> GraphDiff:
    """The diff of one RewriteResult (`rewrite(gm, plan)`). sources: each layer's F source layer over the
    whole model (`capture.source_layers`; a fragment's store reader has its source elsewhere);
    graph: the graph's index among the captured ones (a fragment)."""
    before = {n.name: n for n in result.original.graph.nodes}
    after = {n.name: n for n in result.gm.graph.nodes}
    if seq_len is None:
        seq_len = _indexed_length(result)
    prefix = frame_prefix(result)
    sources = sources or {b.match.layer: b.source.layer for b in result.bindings}
    layer_of, why = attribute_layers(result.original, prefix)
    changes = _node_changes(result, before, after, layer_of, why)
    removed_names = {c.name for c in changes if c.change == "removed"}
    dropped = key_cache_writes_removed(result)
    layers = []
    for b in result.bindings:
        m = b.match
        heads, dim = _heads_and_dim(before[m.query.name], before[m.topk.name].args[0])
        indexer_nodes = _indexer_nodes(result.original, m, removed_names, layer_of, prefix)
        own_removed = [before[c.name] for c in changes if c.change == "removed" and c.layer == m.layer]
        freed = _freed_parameters(result.original, own_removed)
        is_s = b.role == "S"
        layers.append(LayerDiff(
            layer=m.layer, role=b.role, source=sources[m.layer], module=m.module, heads=heads, head_dim=dim,
            indexer_flops=_flops(indexer_nodes, m, seq_len, heads, dim),
            flops_removed=_flops(own_removed, m, seq_len, heads, dim) if is_s else 0,
            removed_nodes=len(own_removed),
            rewired_nodes=sum(c.change == "rewired" and c.layer == m.layer for c in changes),
            weight_bytes_freed=sum(_nbytes(p) for p in freed), freed_parameters=[parameter_path(p) for p in freed],
            key_cache_bytes_per_token_freed=(dim * _key_itemsize(before[m.key.name])
                                             if is_s and dropped.get(m.layer) else 0),
            key_cache_write_removed=dropped.get(m.layer) if is_s else None))
    added = sum(c.change == "added" for c in changes)
    return GraphDiff(plan=str(result.plan), seq_len=seq_len, nodes_after=len(after),
                     nodes_before=len(after) - added + sum(c.change == "removed" for c in changes),
                     layers=layers, nodes=changes, result=result, notes=key_cache_notes(dropped), graph=graph)


def _node_changes(result, before, after, layer_of, why) -> list[NodeChange]:
    changes = []
    prefix = frame_prefix(result)
    path = lambda node: full_module_path(node, prefix)  # noqa: E731
    removed_by_rewrite = {r.name for r in result.removed}
    for name, node in before.items():
        if name not in after:
            if name in removed_by_rewrite:  # (nodes dead before the rewrite are not its doing)
                changes.append(NodeChange("removed", name, op_name(node) or str(node.target), path(node),
                                          layer_of[name], [a.name for a in tensor_args(node)], [], why[name]))
            continue
        old, new = [a.name for a in tensor_args(node)], [a.name for a in tensor_args(after[name])]
        if old != new:
            changes.append(NodeChange("rewired", name, op_name(node) or node.op, path(node),
                                      layer_of[name], old, new, why[name]))
    added_layers, added_why = attribute_layers(result.gm, prefix)
    for name, node in after.items():
        if name not in before:
            changes.append(NodeChange("added", name, op_name(node) or str(node.target), path(node),
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


def _indexer_nodes(gm, match, removed_names, layer_of, prefix: str = "") -> list[fx.Node]:
    """The nodes of this layer's indexer: under its module path, else (no module info) the removed ones.
    (match.module is the path in the whole model; a fragment's nodes are named from its frame, `prefix`.)"""
    if match.module:
        return [n for n in gm.graph.nodes if full_module_path(n, prefix) == match.module
                or full_module_path(n, prefix).startswith(match.module + ".")]
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


def _freed_parameters(original: fx.GraphModule, removed: list[fx.Node]) -> list[fx.Node]:
    removed_set = {n.name for n in removed}
    freed = []
    for node in original.graph.nodes:
        if not is_parameter(node) or not node.users:
            continue
        if all(u.name in removed_set for u in node.users):
            freed.append(node)
    return freed


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


__all__ = ["DIFF_STAGES", "GraphDiff", "LayerDiff", "NodeChange", "SCHEMA_VERSION", "attribute_layers", "diff_rewrite",
           "graph_diff", "key_cache_notes", "key_cache_writes_removed", "node_layers"]
