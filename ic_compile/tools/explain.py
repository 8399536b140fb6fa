"""`explain(model, example_inputs, plan=...)`: what the indexcache rewrite finds and changes.

A model with graph breaks is captured as several graphs; each one holding indexers is rewritten as
the backend binds it (a fragment: plan positions over the whole model, top-k carried between
fragments by the index store). The report then lists each fragment and sums over them; every count
is taken from the rewritten graphs."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from ..capture import GraphRecorder, capture, capture_graphs, indexer_results, rewrite_graphs, source_layers
from ..rewrite import RewriteResult, rewrite
from .attribution import attribute_layers, frame_prefix, key_cache_notes, key_cache_writes_removed


@dataclass
class ExplainReport:
    layers: list[dict]  # {"layer", "role", "source", "module", "removed_nodes"}
    removed_nodes: int
    nodes_before: int
    nodes_after: int
    other_topk: int  # topk calls left alone (MoE routers, ...) in the graph(s) holding indexers
    key_cache_dropped: list[int]  # S layers whose indexer key-cache writes are absent from the rewritten graph
    key_cache_kept: list[int]  # S layers whose writes are still in it (cache layout not recognised)
    plan: str
    graphs: int = 1
    notes: list[str] = field(default_factory=list)
    # graph breaks: one entry per graph holding indexers ({"graph": index among the captured graphs, "frame":
    # its module path, "positions": plan positions over the model, "layers", "roles", "reads", "writes":
    # index-store traffic by layer, "removed_nodes", "nodes_before", "nodes_after"}); empty for one graph
    fragments: list[dict] = field(default_factory=list)
    # F layer -> "" when the fused op (ic::indexer_topk, what the backend's kernels run) takes its
    # indexer, else why it would run as the model wrote it
    fused_op: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        graph_nodes = f"nodes of the {len(self.fragments)} graphs holding indexers" if self.fragments else "graph nodes"
        lines = [f"indexcache plan {self.plan}: {sum(l['role'] == 'F' for l in self.layers)} of "
                 f"{len(self.layers)} indexer layers kept, {self.removed_nodes} of {self.nodes_before} "
                 f"{graph_nodes} removed; {self.other_topk} other topk (e.g. MoE routers) untouched"]
        if self.fragments:
            lines += _fragment_lines(self)
        lines.append(f"{'layer':>5}  {'role':4}  {'source':>6}  {'removed':>7}  {'fused':5}  module")
        for l in self.layers:
            fused = "-" if l["layer"] not in self.fused_op else ("no" if self.fused_op[l["layer"]] else "yes")
            lines.append(f"{l['layer']:>5}  {l['role']:4}  {l['source']:>6}  {l['removed_nodes']:>7}  {fused:5}  "
                         f"{l['module']}")
        lines += [f"F layer {layer} runs as the model wrote it, not in the fused op: {why}"
                  for layer, why in sorted(self.fused_op.items()) if why]
        if self.key_cache_dropped:
            lines.append(f"indexer key-cache writes removed for S layers {self.key_cache_dropped}")
        if self.key_cache_kept:
            lines.append(f"indexer key-cache writes still paid by S layers {self.key_cache_kept}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fragment_lines(report: ExplainReport) -> list[str]:
    lines = [f"graph breaks: the model compiles into {report.graphs} graphs, {len(report.fragments)} of them "
             "holding indexers (bound as the backend binds them; S layers whose F source is in another graph "
             "read its top-k from the index store):"]
    for f in report.fragments:
        store = ([f"layer {r} reads layer {s}'s top-k" for r, s in f["reads"]]
                 + [f"writes layer {w}'s top-k for layers {readers}" for w, readers in f["writes"]])
        lines.append(f"  graph {f['graph']} (frame {f['frame'] or '<model>'}): layers {f['layers']} "
                     f"{f['roles']}; {f['removed_nodes']} of {f['nodes_before']} nodes removed"
                     + (f"; {', '.join(store)}" if store else ""))
    return lines


def explain(model, example_inputs, plan=None, **kwargs) -> ExplainReport:
    recorder = capture(model, example_inputs, **kwargs)
    results = rewrite_graphs(recorder, plan)
    found = indexer_results(results, "explain", "nothing to share")
    report = _report(found, source_layers(found))
    report.graphs = len(recorder.graphs)
    report.fused_op = _fused_op(recorder, results, found, plan)
    if found[0].fragment is not None:
        layer_at = {p: b.match.layer for r in found for p, b in zip(r.fragment.layers, r.fragment.bindings)}
        report.fragments = [_fragment(results.index(r), r, layer_at) for r in found]
    return report


def _fused_op(recorder: GraphRecorder, results: list[RewriteResult], found: list[RewriteResult], plan) -> dict:
    """Per F layer, "" or why the fused op would not take its indexer: the graphs rewritten again
    with kernels (as the backend does on CUDA), the lowering's own verdicts."""
    verdicts = {}
    for result in found:
        i = results.index(result)
        with warnings.catch_warnings():  # the verdicts are the report; no UnloweredIndexerWarning as well
            warnings.simplefilter("ignore")
            kernels = rewrite(recorder.graphs[i], plan, layout=recorder.layouts[i], kernels=True).kernels
        verdicts.update({layer: "" for layer in kernels.lowered})
        verdicts.update(kernels.skipped)
    return verdicts


def _report(found: list[RewriteResult], sources: dict[int, int]) -> ExplainReport:
    """Counted over the graphs `found` (one whole-model graph, or the fragments)."""
    layers, removed_by_layer, counted = [], Counter(), {}
    for result in found:
        layer_of = attribute_layers(result.original, frame_prefix(result))[0]  # nn_module_stack / readers
        removed_by_layer.update(layer_of.get(n.name, n.layer) for n in result.removed)
        counted.update(key_cache_writes_removed(result))  # from the rewritten graph, not the pass's own flag
        layers += [{"layer": b.match.layer, "role": b.role, "source": sources[b.match.layer], "module": b.match.module,
                    "removed_nodes": 0} for b in result.bindings]
    layers.sort(key=lambda l: l["layer"])
    for l in layers:
        l["removed_nodes"] = removed_by_layer.get(l["layer"], 0) if l["role"] == "S" else 0
    before, after = zip(*(_node_counts(r) for r in found))
    return ExplainReport(
        layers=layers, removed_nodes=sum(len(r.removed) for r in found), nodes_before=sum(before),
        nodes_after=sum(after), other_topk=sum(len(r.detection.other_topk) for r in found),
        key_cache_dropped=sorted(layer for layer, removed in counted.items() if removed),
        key_cache_kept=sorted(layer for layer, removed in counted.items() if removed is False),
        plan=str(found[0].plan), notes=_unattributed(removed_by_layer, layers) + key_cache_notes(counted))


def _node_counts(result: RewriteResult) -> tuple[int, int]:
    """(before, after): nodes of the original still live before the rewrite (kept or removed by it; not
    those dead already), and nodes of the rewritten graph (with any it added, e.g. index-store inputs)."""
    after = {n.name for n in result.gm.graph.nodes}
    kept = sum(n.name in after for n in result.original.graph.nodes)
    return kept + len(result.removed), len(after)


def _fragment(graph: int, result: RewriteResult, layer_at: dict[int, int]) -> dict:
    """One fragment's entry; its store reads ([S, F]) and writes ([F, [S, ...]]) by layer number."""
    fragment = result.fragment
    before, after = _node_counts(result)
    return {"graph": graph, "frame": frame_prefix(result), "positions": list(fragment.layers),
            "layers": [b.match.layer for b in fragment.bindings],
            "roles": "".join(b.role for b in fragment.bindings),
            "reads": [[layer_at[r.layer], layer_at[r.source]] for r in fragment.reads],
            "writes": [[layer_at[w.layer], [layer_at[s] for s in w.readers]] for w in fragment.writes],
            "removed_nodes": len(result.removed), "nodes_before": before, "nodes_after": after}


def _unattributed(removed_by_layer: Counter, layers: list[dict]) -> list[str]:
    """Removed nodes not under one indexer layer: said, so the per-layer column adds up to the total."""
    outside = sum(count for layer, count in removed_by_layer.items()
                  if layer not in {l["layer"] for l in layers if l["role"] == "S"})
    return [f"{outside} removed nodes belong to no S layer (shared by several layers)"] if outside else []


__all__ = ["ExplainReport", "capture_graphs", "explain"]  # capture_graphs: from ic_compile.capture
