"""`explain(model, example_inputs, plan=...)`: what the indexcache rewrite finds and changes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..capture import capture_graphs, indexer_graph
from ..rewrite import RewriteResult, rewrite
from .attribution import attribute_layers, key_cache_notes, key_cache_writes_removed


@dataclass
class ExplainReport:
    layers: list[dict]  # {"layer", "role", "source", "module", "removed_nodes"}
    removed_nodes: int
    nodes_before: int
    nodes_after: int
    other_topk: int  # topk calls left alone (MoE routers, ...)
    key_cache_dropped: list[int]  # S layers whose indexer key-cache writes are absent from the rewritten graph
    key_cache_kept: list[int]  # S layers whose writes are still in it (cache layout not recognised)
    plan: str
    graphs: int = 1
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        lines = [f"indexcache plan {self.plan}: {sum(l['role'] == 'F' for l in self.layers)} of "
                 f"{len(self.layers)} indexer layers kept, {self.removed_nodes} of {self.nodes_before} "
                 f"graph nodes removed; {self.other_topk} other topk (e.g. MoE routers) untouched",
                 f"{'layer':>5}  {'role':4}  {'source':>6}  {'removed':>7}  module"]
        for l in self.layers:
            lines.append(f"{l['layer']:>5}  {l['role']:4}  {l['source']:>6}  {l['removed_nodes']:>7}  "
                         f"{l['module']}")
        if self.key_cache_dropped:
            lines.append(f"indexer key-cache writes removed for S layers {self.key_cache_dropped}")
        if self.key_cache_kept:
            lines.append(f"indexer key-cache writes still paid by S layers {self.key_cache_kept}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain(model, example_inputs, plan=None, **kwargs) -> ExplainReport:
    graphs = capture_graphs(model, example_inputs, **kwargs)
    found = indexer_graph([rewrite(gm, plan) for gm in graphs], "explain", "nothing to share")
    report = _report(found)
    report.graphs = len(graphs)
    return report


def _report(result: RewriteResult) -> ExplainReport:
    layer_of = attribute_layers(result.original)[0]  # by nn_module_stack / the layer a node feeds
    removed_by_layer = Counter(layer_of.get(n.name, n.layer) for n in result.removed)
    counted = key_cache_writes_removed(result)  # from the rewritten graph, not the pass's own flag
    layers = [{"layer": b.match.layer, "role": b.role, "source": b.source.layer, "module": b.match.module,
               "removed_nodes": removed_by_layer.get(b.match.layer, 0) if b.role == "S" else 0}
              for b in result.bindings]
    return ExplainReport(
        layers=layers, removed_nodes=len(result.removed),
        nodes_before=len(result.gm.graph.nodes) + len(result.removed), nodes_after=len(result.gm.graph.nodes),
        other_topk=len(result.detection.other_topk),
        key_cache_dropped=[layer for layer, removed in counted.items() if removed],
        key_cache_kept=[layer for layer, removed in counted.items() if removed is False],
        plan=str(result.plan), notes=_unattributed(removed_by_layer, layers) + key_cache_notes(counted))


def _unattributed(removed_by_layer: Counter, layers: list[dict]) -> list[str]:
    """Removed nodes not under one indexer layer: said, so the per-layer column adds up to the total."""
    outside = sum(count for layer, count in removed_by_layer.items()
                  if layer not in {l["layer"] for l in layers if l["role"] == "S"})
    return [f"{outside} removed nodes belong to no S layer (shared by several layers)"] if outside else []


__all__ = ["ExplainReport", "capture_graphs", "explain"]  # capture_graphs: from ic_compile.capture
