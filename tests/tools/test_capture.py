"""Graph capture (ic_compile.capture): the graphs torch.compile hands a backend with their frames'
layouts, their rewrite as the backend binds them, and the check that they hold every indexer once, on
the tiny reference model (one graph) and on a copy broken in two (two fragments)."""

import pytest
import torch

import ic_compile
from ic_compile import dsa_model
from ic_compile.capture import (GraphRecorder, capture, capture_graphs, indexer_results, record_graphs, rewrite_graphs,
                                source_layers, split_inputs)
from ic_compile.plan import PlanError
from ic_compile.rewrite import NoIndexerFoundError, rewrite
from tiny_models import random_ids


class BrokenInTwo(dsa_model.Transformer):
    """The reference model with a graph break between its first and second half of layers."""

    def forward(self, idx, input_pos=None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x, topk = self.tok_embeddings(idx), None
        half = len(self.layers) // 2
        for i, layer in enumerate(self.layers):
            if i == half:
                torch._dynamo.graph_break()
            x, topk = layer(x, cos, sin, positions, topk, False)
        return self.output(self.norm(x))


def tiny(cls=dsa_model.Transformer):
    return dsa_model.init_weights(cls(dsa_model.ModelArgs.tiny()), 0).eval()


def ids():
    return random_ids(batch=1, seq=16, vocab=256)


def test_split_inputs_takes_dicts_tensors_and_tuples():
    x = torch.zeros(2)
    assert split_inputs({"idx": x}, {"input_pos": None}) == ((), {"idx": x, "input_pos": None})
    assert split_inputs(x) == ((x,), {})
    assert split_inputs([x, 0], {"k": 1}) == ((x, 0), {"k": 1})


def test_one_graph_holds_every_indexer(one_thread):
    model = tiny()
    graphs = capture_graphs(model, {"idx": ids()})
    assert len(graphs) == 1 and ic_compile.capture_graphs is capture_graphs
    [result] = indexer_results([rewrite(gm, "FSSF") for gm in graphs], "test", "hint")
    assert len(result.detection.matches) == model.args.n_layers == 4
    assert str(result.plan) == "FSSF"


def test_recorder_keeps_inputs_and_runs_the_runner(one_thread):
    model, x = tiny(), ids()
    recorder = record_graphs(model, lambda compiled: compiled(x))
    placeholders = [n for n in recorder.graphs[0].graph.nodes if n.op == "placeholder"]
    assert len(recorder.inputs) == 1 and len(recorder.inputs[0]) == len(placeholders)
    assert any(t is x for t in recorder.inputs[0])  # the real tensors Dynamo passed, not copies

    calls = []
    recorder = GraphRecorder(runner=lambda slot: calls.append(slot) or recorder.graphs[slot].forward)
    compiled = torch.compile(model, backend=recorder, dynamic=False)
    with torch.no_grad():
        want, got = model(x), compiled(x)
        compiled(x)  # no recompile: the runner is looked up again
    assert calls == [0, 0] and torch.allclose(want, got)


def test_graph_break_between_indexers_gives_fragments(one_thread):
    """Dynamo (torch 2.13) compiles each layer's frame on its own around the break: each is bound as a
    fragment by its module path, S layers 1 and 2 read layer 0's top-k from the index store, and
    explain reports what it reports for the unbroken model."""
    model = tiny(BrokenInTwo)
    recorder = capture(model, {"idx": ids()})
    found = indexer_results(rewrite_graphs(recorder, "FSSF"), "search", "nothing to search")
    assert len(recorder.graphs) > len(found) > 1 and len(recorder.layouts) == len(recorder.graphs)
    assert sorted(p for r in found for p in r.fragment.layers) == [0, 1, 2, 3]
    assert sorted((r.layer, r.source) for f in found for r in f.fragment.reads) == [(1, 0), (2, 0)]
    assert source_layers(found) == {0: 0, 1: 0, 2: 0, 3: 3}
    broken = ic_compile.explain(model, {"idx": ids()}, plan="FSSF")
    torch._dynamo.reset()
    whole = ic_compile.explain(tiny(), {"idx": ids()}, plan="FSSF")
    # (node counts differ by a cast or two: a fragment receives as an input what the whole graph computes)
    roles = lambda report: [(l["layer"], l["role"], l["source"], l["module"]) for l in report.layers]  # noqa: E731
    assert roles(broken) == roles(whole) and all(l["removed_nodes"] > 0 for l in broken.layers if l["role"] == "S")
    assert broken.removed_nodes == sum(f["removed_nodes"] for f in broken.fragments) > 0
    assert len(broken.fragments) == len(found) and not whole.fragments


def test_fragments_missing_an_indexer_are_a_plan_error(one_thread):
    """A fragment Dynamo did not compile (its indexers absent from every captured graph) is named."""
    recorder = capture(tiny(BrokenInTwo), {"idx": ids()})
    results = [r for r in rewrite_graphs(recorder, "FSSF") if not (r.fragment and r.fragment.layers == [2])]
    with pytest.raises(PlanError, match=r"explain: the model's 4 indexer modules are not each in one captured "
                                        r"graph \(missing plan positions \[2\], in several graphs \[\]\)"):
        indexer_results(results, "explain", "nothing to share")


def test_no_indexer_names_the_tool_and_the_hint(one_thread):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    graphs = capture_graphs(model, torch.randint(0, 10, (1, 6)))
    with pytest.raises(NoIndexerFoundError, match=r"^graph diff: no lightning indexer found in the model's 1 "
                                                  r"graph\(s\); is this a DSA model\?$"):
        indexer_results([rewrite(gm) for gm in graphs], "graph diff", "is this a DSA model?")
