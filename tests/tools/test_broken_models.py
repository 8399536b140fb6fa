"""explain, graph diff and search on a model with graph breaks (issue 21): each graph holding indexers is
bound as the backend binds it (a fragment), and what the tools report is counted from those rewritten
graphs. The oracle for counts is the same model with its MoE written to compile into one graph (same
weights); for search, the eager model under shared_indexer_hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dsa_styles as ds
from ic_compile.reference import shared_indexer_hooks
from ic_compile.tools.explain import explain
from ic_compile.tools.graph_diff import graph_diff
from ic_compile.tools.search import evaluate_plan

EXPERTS = 4
PLAN = "FSSF"


class MoE(nn.Module):
    """Top-1 MoE. host_dispatch=True dispatches with host-side counts, as real MoE code does (graph
    breaks); False computes every expert and keeps the chosen one (one graph, same weights)."""

    def __init__(self, dim: int, host_dispatch: bool):
        super().__init__()
        self.host_dispatch = host_dispatch
        self.gate = nn.Linear(dim, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.SiLU()) for _ in range(EXPERTS))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(0, 1)
        weight, expert = self.gate(flat).softmax(-1).topk(1, dim=-1)  # a router topk, not an indexer
        if not self.host_dispatch:
            chosen = F.one_hot(expert[:, 0], EXPERTS).to(flat.dtype) * weight
            return sum(chosen[:, e:e + 1] * self.experts[e](flat) for e in range(EXPERTS)).view_as(x)
        counts = torch.bincount(expert.flatten(), minlength=EXPERTS).tolist()  # graph break
        order, out, start = expert.flatten().argsort(), torch.zeros_like(flat), 0
        for e, count in enumerate(counts):
            rows = order[start:start + count]
            out[rows] = self.experts[e](flat[rows]) * weight[rows]
            start += count
        return out.view_as(x)


def moe_model(host_dispatch: bool, style: str = "scores") -> ds.Transformer:
    net = ds.model(style)
    torch.manual_seed(1)
    for block in net.layers:
        block.ffn = MoE(net.embed.embedding_dim, host_dispatch)
    return net.eval()


def inputs():
    return ds.tokens(), 0


@pytest.fixture(scope="module", params=["scores", "official", "community"])
def reports(request):
    """explain of the broken and the one-graph model (each capture ~3 s on one thread). The official
    and community styles also keep per-key scale caches and attribute state, which a fragment must
    drop as one graph does (their module paths are relative to the fragment's frame)."""
    torch.set_num_threads(1)
    torch._dynamo.reset()
    broken = explain(moe_model(True, request.param), inputs(), plan=PLAN)
    torch._dynamo.reset()
    return broken, explain(moe_model(False, request.param), inputs(), plan=PLAN), request.param


@pytest.fixture(scope="module")
def diffs():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    broken = graph_diff(moe_model(True), inputs(), plan=PLAN, seq_len=64)
    torch._dynamo.reset()
    return broken, graph_diff(moe_model(False), inputs(), plan=PLAN, seq_len=64)


def test_explain_lists_fragments_and_sums_as_one_graph(reports):
    broken, whole, _ = reports
    assert whole.graphs == 1 and not whole.fragments
    assert broken.graphs > 4 and [f["positions"] for f in broken.fragments] == [[0], [1], [2], [3]]
    assert [(f["roles"], f["reads"], f["writes"]) for f in broken.fragments] == [
        ("F", [], [[0, [1, 2]]]), ("S", [[1, 0]], []), ("S", [[2, 0]], []), ("F", [], [])]
    key = lambda r: [(l["layer"], l["role"], l["source"], l["removed_nodes"]) for l in r.layers]  # noqa: E731
    assert key(broken) == key(whole) and [l[1] for l in key(broken)] == list(PLAN)
    assert broken.removed_nodes == whole.removed_nodes == sum(f["removed_nodes"] for f in broken.fragments) > 0
    assert broken.key_cache_dropped == whole.key_cache_dropped == [1, 2]
    assert sum(f["nodes_before"] - f["nodes_after"] for f in broken.fragments) == broken.nodes_before - broken.nodes_after
    text = str(broken)
    assert text.startswith(f"indexcache plan {PLAN}: 2 of 4 indexer layers kept, {broken.removed_nodes} of ")
    assert f"graph breaks: the model compiles into {broken.graphs} graphs, 4 of them holding indexers" in text
    assert "(frame layers.1): layers [1] S" in text and "layer 1 reads layer 0's top-k" in text
    assert "graph breaks" not in str(whole)


def test_explain_removed_nodes_are_the_s_indexers_ops(reports):
    """Counted from the graphs: every node removed from an S layer's fragment is an op of its indexer
    (tests/dsa_styles.indexer_ops over the original fragment), and explain reports that many."""
    from ic_compile.capture import capture, rewrite_graphs
    torch._dynamo.reset()
    results = rewrite_graphs(capture(moe_model(True, reports[2]), inputs()), PLAN)
    readers = [r for r in results if r.fragment is not None and r.fragment.reads]
    assert [r.layout.prefix for r in readers] == ["layers.1", "layers.2"]
    for r, layer in zip(readers, (1, 2)):
        removed = {n.name for n in r.removed}
        assert removed and removed <= {n.name for n in ds.indexer_ops(r.original, "attn.indexer")}
        assert next(l for l in reports[0].layers if l["layer"] == layer)["removed_nodes"] == len(removed)


def test_graph_diff_sums_fragments_like_one_graph(diffs, tmp_path):
    broken, whole = diffs
    fields = lambda d: [(l.layer, l.role, l.source, l.heads, l.head_dim, l.indexer_flops, l.flops_removed,  # noqa: E731
                         l.removed_nodes, l.weight_bytes_freed, l.key_cache_bytes_per_token_freed) for l in d.layers]
    assert fields(broken) == fields(whole)
    for total in ("indexer_flops", "flops_removed", "removed_nodes", "weight_bytes_freed",
                  "key_cache_bytes_per_token_freed"):
        assert broken.totals[total] == whole.totals[total], total
    assert broken.totals["flops_removed"] > 0 and broken.totals["weight_bytes_freed"] > 0
    data = broken.to_dict()
    assert [f["layers"] for f in data["fragments"]] == [[0], [1], [2], [3]] and "fragments" not in whole.to_dict()
    assert sum(f["removed_nodes"] for f in data["fragments"]) == broken.totals["removed_nodes"]
    assert "graph breaks: 4 graphs hold indexers" in str(broken)
    page = broken.to_html(tmp_path / "diff.html")
    for layer, graph in zip(range(4), [f["graph"] for f in data["fragments"]]):
        assert f"data-layer='{layer}'" in page and f"graph {graph}" in page


def test_search_loss_on_broken_model_equals_hooks(one_thread):
    """The graph evaluator runs every fragment rewritten, top-k crossing fragments through an index
    store: its lm_loss equals the eager model's under shared_indexer_hooks, and the plan matters."""
    net, data = moe_model(True), ds.tokens(batch=4, seq=12, seed=5)
    want = {}
    for plan in (PLAN, "FSSS"):
        with torch.no_grad(), shared_indexer_hooks(net, plan):  # batches of 2: the model's cache size
            logits = torch.cat([net(batch, 0)[:, :-1] for batch in data.split(2)])
        want[plan] = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten()).item()
    got = {plan: evaluate_plan(net, data, plan, batch_size=2, evaluator="graph") for plan in want}
    assert got == pytest.approx(want, abs=1e-5)
    assert abs(want[PLAN] - want["FSSS"]) > 1e-4


def test_search_refuses_a_call_that_ran_an_indexer_unrewritten(one_thread):
    """A layer Dynamo runs uncompiled (here: disabled) runs its indexer in full: that loss is not the
    plan's, so the evaluator raises instead of returning it."""
    from ic_compile.plan import PlanError
    from ic_compile.tools.evaluators import GraphEvaluator
    net, data = moe_model(True), ds.tokens(seed=5)
    evaluator = GraphEvaluator(net)
    assert evaluator.num_layers(data) == 4
    evaluator.logits(data, PLAN)
    net.layers[3].forward = torch._dynamo.disable(net.layers[3].forward)
    with pytest.raises(PlanError, match=r"ran indexer layers \[0, 1, 2\] rewritten \(of 4\)"):
        evaluator.logits(data, PLAN)


def broken_scores_model() -> nn.Module:
    """`ic --model test_broken_models:broken_scores_model`: the graph-broken MoE model as a CLI factory."""
    return moe_model(True)


def test_cli_search_on_broken_model_equals_the_api(one_thread, tmp_path, monkeypatch, capsys):
    """`ic search` (a MODULE:FUNCTION model, graph evaluator) on a model with graph breaks writes the
    plan and losses that search_plan gives on the same calibration data."""
    import json
    import pathlib

    from ic_compile.cli import main
    from ic_compile.tools.calibration import calibration_from_files
    from ic_compile.tools.search import search_plan

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(pathlib.Path(ds.__file__).read_text())  # any text: bytes % vocab
    monkeypatch.chdir(pathlib.Path(__file__).parent)  # the factory's module, as a user's working directory
    out = tmp_path / "search"
    argv = ["search", "--model", "test_broken_models:broken_scores_model", "--data", str(corpus), "--num-full", "2",
            "--seq", "12", "--batch", "2", "--max-sequences", "4", "--evaluator", "graph", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    got = json.loads((out / "search.json").read_text())
    data = calibration_from_files([str(corpus)], 12, vocab_size=128, max_sequences=4)
    want = search_plan(broken_scores_model(), data, num_full=2, batch_size=2, evaluator="graph")
    assert json.loads((out / "plan.json").read_text()) == json.loads(want.plan.to_json())
    got.pop("seconds")
    assert got == {key: value for key, value in json.loads(want.to_json()).items() if key != "seconds"}
    assert got["num_full"] == 2 and len(got["history"]) >= 2  # the search ran down from all-F
