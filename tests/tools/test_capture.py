"""Graph capture (ic_compile.capture): the graphs torch.compile hands a backend, and the check that one
of them holds every indexer, on the tiny reference model (one graph) and on a copy broken in two."""

import pytest
import torch

import ic_compile
from ic_compile import dsa_model
from ic_compile.capture import GraphRecorder, capture_graphs, indexer_graph, record_graphs, split_inputs
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
    result = indexer_graph([rewrite(gm, "FSSF") for gm in graphs], "test", "hint")
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


def test_graph_break_between_indexers_is_a_plan_error(one_thread):
    model = tiny(BrokenInTwo)
    graphs = capture_graphs(model, {"idx": ids()})
    results = [rewrite(gm) for gm in graphs]
    holding = sum(bool(r.detection.matches) for r in results)
    assert len(graphs) >= 2 and holding >= 2
    message = (rf"search: the model was split into {len(graphs)} graphs with indexers in {holding} of them "
               r"\(graph breaks\); search needs every indexer layer in one graph")
    with pytest.raises(PlanError, match=message):
        indexer_graph(results, "search", "nothing to search")
    with pytest.raises(PlanError, match="explain: the model was split into"):  # the tools call the same check
        ic_compile.explain(model, {"idx": ids()})


def test_no_indexer_names_the_tool_and_the_hint(one_thread):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    graphs = capture_graphs(model, torch.randint(0, 10, (1, 6)))
    with pytest.raises(NoIndexerFoundError, match=r"^graph diff: no lightning indexer found in the model's 1 "
                                                  r"graph\(s\); is this a DSA model\?$"):
        indexer_graph([rewrite(gm) for gm in graphs], "graph diff", "is this a DSA model?")
