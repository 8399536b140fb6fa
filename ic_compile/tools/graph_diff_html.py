"""The HTML view of a graph diff (`GraphDiff.to_html`, `ic diff --html`): one self-contained page with
the per-layer table, each layer's graph (before ∪ after, as SVG, laid out by networkx generations) with
removed / rewired / added nodes marked, and a layer filter. Also the number formats of the text table.
A model with graph breaks draws each layer from the fragment (graph) holding it, named in its title."""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from torch import fx

from ic_compile.passes.graph_ops import full_module_path, is_parameter, op_name, shape_of, tensor_args

from .attribution import frame_prefix, node_layers, parameter_path

if TYPE_CHECKING:
    from .graph_diff import GraphDiff, LayerDiff


def format_si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def format_bytes(x: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x} B"


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


def _layer_graph(part: GraphDiff, layer, layer_of, status) -> "object":
    """networkx DiGraph of one layer's nodes (before ∪ after) in the graph of `part` (the diff of one
    graph), plus ghost nodes for inputs from elsewhere. layer_of: every node's layer, added ones too."""
    import networkx as nx
    result = part.result
    prefix = frame_prefix(result)
    before = {n.name: n for n in result.original.graph.nodes}
    after = {n.name: n for n in result.gm.graph.nodes}
    order = {name: i for i, name in enumerate(list(before) + [n for n in after if n not in before])}
    dead = {n for n in before if n not in after and n not in status}  # dead before the rewrite
    members = [name for name in order
               if name not in dead and _layer_key(layer_of.get(name)) == layer
               and (before.get(name) or after.get(name)).op not in ("output",)]
    graph = nx.DiGraph()
    for name in members:
        node = before.get(name) or after[name]
        graph.add_node(name, order=order[name], op=_label_op(node), status=status.get(name, "kept"),
                       module=full_module_path(node, prefix), ghost=False, shape=str(list(shape_of(node) or [])))
    for name in members:
        old = [a.name for a in tensor_args(before[name])] if name in before else []
        new = [a.name for a in tensor_args(after[name])] if name in after else []
        for src in dict.fromkeys(old + new):
            if src not in graph:
                node = before.get(src) or after[src]  # from another layer, or a graph input: a ghost
                graph.add_node(src, order=order.get(src, 0), op=_label_op(node), status="ghost",
                               module=full_module_path(node, prefix), ghost=True, shape=str(list(shape_of(node) or [])),
                               ghost_layer=layer_of.get(src))
            kind = ("kept" if src in old and src in new else "removed" if src in old else "added")
            if status.get(name) == "removed":
                kind = "removed"
            graph.add_edge(src, name, kind=kind)
    return graph


def _layer_key(layer) -> str:
    return "other" if layer is None else str(layer)


def _label_op(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        if not is_parameter(node):
            return "input"
        return ".".join(parameter_path(node).split(".")[-2:])
    return op_name(node) or node.op


def render_html(diff: GraphDiff) -> str:
    """The page of `diff` (needs its rewrite result: a diff read back from JSON cannot be drawn)."""
    if any(part.result is None for part in diff.parts):
        raise ValueError("this GraphDiff has no rewrite result attached (built from JSON?); cannot draw it")
    roles = {str(l.layer): l for l in diff.layers}
    drawn, keys = [], set(roles)
    for part in diff.parts:
        layer_of = {**node_layers(part.result.original, frame_prefix(part.result)),
                    **{c.name: c.layer for c in part.nodes if c.change == "added"}}
        status = {c.name: c.change for c in part.nodes}
        for layer in part.layers:
            for p in layer.freed_parameters:
                status[p] = "freed"
        where = f"graph {part.graph}" if diff.fragments else ""
        for key in {_layer_key(v) for v in layer_of.values()} | {str(l.layer) for l in part.layers}:
            graph = _layer_graph(part, key, layer_of, status)
            if graph.number_of_nodes():
                held = next((l for l in part.layers if str(l.layer) == key), None)  # its indexer is in this graph
                drawn.append((_key_order(key), part.graph or 0, _svg_section(key, graph, held, where)))
        keys |= {_layer_key(v) for v in layer_of.values()}
    keys = sorted(keys, key=_key_order)
    sections = [section for *_, section in sorted(drawn, key=lambda d: d[:2])]
    t = diff.totals
    first_s = next((str(l.layer) for l in diff.layers if l.role == "S"), keys[0])
    data = html.escape(json.dumps({k: v for k, v in diff.to_dict().items() if k != "nodes"}))
    return _PAGE.format(plan=html.escape(diff.plan), seq=diff.seq_len, before=diff.nodes_before,
                        after=diff.nodes_after, removed=t["removed_nodes"], rewired=t["rewired_nodes"],
                        added=t["added_nodes"], flops=format_si(t["flops_removed"]),
                        flops_all=format_si(t["indexer_flops"]), frac=f"{100 * t['flops_removed_fraction']:.1f}",
                        wbytes=format_bytes(t["weight_bytes_freed"]), kbytes=t["key_cache_bytes_per_token_freed"],
                        rows=_layer_rows(diff), changes=_change_rows(diff),
                        options="".join(_option(k, roles.get(k)) for k in keys), sections="".join(sections),
                        first=first_s, data=data, css=_CSS, js=_JS)


def _key_order(key: str) -> tuple:
    return key == "other", int(key) if key.isdigit() else 0


def _layer_rows(diff: GraphDiff) -> str:
    return "".join(
        f"<tr data-layer='{l.layer}' class='role{l.role}'><td>{l.layer}</td><td>{l.role}</td><td>{l.source}</td>"
        f"<td>{l.heads}×{l.head_dim}</td><td>{format_si(l.indexer_flops)}</td><td>{format_si(l.flops_removed)}</td>"
        f"<td>{l.removed_nodes}</td><td>{l.rewired_nodes}</td><td>{format_bytes(l.weight_bytes_freed)}</td>"
        f"<td>{l.key_cache_bytes_per_token_freed}</td><td>{html.escape(l.module)}</td></tr>" for l in diff.layers)


def _change_rows(diff: GraphDiff) -> str:
    return "".join(
        f"<tr data-layer='{_layer_key(c.layer)}' class='c{c.change}'><td>{c.change}</td><td>{_layer_key(c.layer)}</td>"
        f"<td>{html.escape(c.name)}</td><td>{html.escape(c.op)}</td><td>{html.escape(', '.join(c.inputs_before))}</td>"
        f"<td>{html.escape(', '.join(c.inputs_after))}</td><td>{html.escape(c.module)}</td></tr>" for c in diff.nodes)


def _option(key: str, layer: LayerDiff | None) -> str:
    role = ""
    if layer is not None:
        role = f" ({layer.role}" + (f" ← {layer.source}" if layer.role == "S" else "") + ")"
    return f"<option value='{key}'>{'layer ' + key if key != 'other' else 'outside layers'}{role}</option>"


def _svg_section(key: str, graph, layer: LayerDiff | None, where: str = "") -> str:
    """One layer's drawing; `where`: the graph it is drawn from, for a model with graph breaks."""
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
             f"{format_si(layer.flops_removed)} FLOPs removed" if layer else "") + (f" · {where}" if where else "")
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


__all__ = ["format_bytes", "format_si", "render_html"]
