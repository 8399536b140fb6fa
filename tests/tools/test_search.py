"""Greedy plan search (ic_compile.tools.search): known answers, exactness vs the backend, I/O, errors."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from ic_compile.plan import LayerPlan, PlanError
from ic_compile.tools.calibration import as_batches, calibration_from_files
from ic_compile.tools.search import evaluate_plan, search_plan
from ic_compile.dsa_model import ModelArgs, Transformer, init_weights


pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24  # > index_topk (8): the indexers really select


def make_model(seed=0, zero_wo=()):
    torch.manual_seed(seed)
    model = init_weights(Transformer(ModelArgs.tiny()), seed=seed).eval()
    with torch.no_grad():
        for layer in zero_wo:  # attention output cannot depend on which keys are selected
            model.layers[layer].attn.wo.weight.zero_()
    return model


def ids(n=4, seq=SEQ, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def backend_lm_loss(model, data, plan, batch_size):
    compiled = torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": "eager"})
    with torch.no_grad():
        logits = torch.cat([compiled(b) for b in data.split(batch_size)])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1)).item()


def test_selection_independent_layers_are_shared_first():
    """Layers 1 and 3 have a zero attention output projection: making them S changes nothing, so
    under the label-free KL objective they are exactly free (KL 0) and chosen before layer 2."""
    model = make_model(zero_wo=(1, 3))
    result = search_plan(model, ids(), num_full=2, objective="kl", progress=False)
    assert result.plan.pattern == "FSFS"
    assert result.history[0].pattern == "FFFF" and result.full_loss == 0.0
    first = result.history[1]
    assert first.candidates[1] == 0.0 and first.candidates[3] == 0.0 and first.candidates[2] > 1e-6
    assert {result.history[1].turned_shared, result.history[2].turned_shared} == {1, 3}
    assert result.loss == 0.0
    # 1 all-F + 3 candidates + 2 candidates
    assert result.evaluations == 6 and result.seconds > 0


def test_kl_without_reference_cache_gives_the_same_search():
    """Over the cache limit the all-F log-probs are recomputed per evaluation: same numbers."""
    model, data = make_model(seed=2), ids(n=4, seed=3)
    cached = search_plan(model, data, num_full=2, objective="kl", batch_size=2, progress=False)
    uncached = search_plan(model, data, num_full=2, objective="kl", batch_size=2, progress=False,
                           cache_limit_bytes=SEQ * 256 * 4)  # room for one sequence only
    assert cached.plan == uncached.plan
    for a, b in zip(cached.history, uncached.history, strict=True):
        assert a.candidates.keys() == b.candidates.keys()
        assert all(abs(a.candidates[l] - b.candidates[l]) < 1e-7 for l in a.candidates)


def test_loss_budget_stops_before_exceeding():
    model = make_model(zero_wo=(1, 3))
    result = search_plan(model, ids(), loss_budget=0.0, objective="kl", progress=False)
    assert result.plan.pattern == "FSFS"  # turning layer 2 S would cost KL > 0
    assert "loss budget" in result.stop_reason and result.rejected and result.rejected[2] > 0


def test_search_loss_equals_indexcache_backend_prefix():
    """Prefix evaluator (cached leading layers, eager blocks) vs the compiled backend."""
    model, data = make_model(), ids(n=4)
    result = search_plan(model, data, num_full=2, objective="lm_loss", batch_size=2, progress=False)
    assert result.plan.num_full == 2 and result.evaluator == "prefix"
    expected = backend_lm_loss(model, data, result.plan.pattern, batch_size=2)
    assert abs(result.loss - expected) < 1e-5
    torch._dynamo.reset()
    assert abs(evaluate_plan(model, data, "FFSS", batch_size=2)
               - backend_lm_loss(model, data, "FFSS", batch_size=2)) < 1e-5


def test_graph_evaluator_equals_backend_and_prefix_along_the_path():
    """Graph evaluator (captured Dynamo graph + rewrite per candidate): same path and losses as the
    prefix evaluator at every candidate, and the backend's loss for the final plan."""
    model, data = make_model(seed=3), ids(n=4, seed=4)
    a = search_plan(model, data, ratio=0.25, evaluator="prefix", progress=False, batch_size=2)
    b = search_plan(model, data, ratio=0.25, progress=False, batch_size=2, cache_limit_bytes=0)
    assert b.evaluator == "graph"  # "auto" falls back to the graph when the prefix cache is too big and a.plan == b.plan and a.plan.num_full == 1
    assert a.evaluations == b.evaluations == 1 + 3 + 2 + 1
    for sa, sb in zip(a.history, b.history, strict=True):
        assert sa.pattern == sb.pattern and sa.candidates.keys() == sb.candidates.keys()
        for layer in sa.candidates:
            assert abs(sa.candidates[layer] - sb.candidates[layer]) < 1e-6
    torch._dynamo.reset()
    assert abs(b.loss - backend_lm_loss(model, data, b.plan.pattern, batch_size=2)) < 1e-5


def test_result_json_plot_and_plan_round_trip(tmp_path):
    model = make_model()
    result = search_plan(model, [ids(2, seed=5), ids(2, seed=6)], ratio=0.5, progress=False)
    assert result.plan.num_full == 2 and len(result.history) == 3
    result.plan.to_json(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["index_topk_pattern"] == result.plan.pattern
    assert LayerPlan.from_json(tmp_path / "plan.json") == result.plan
    assert result.plan_with(3).num_full == 3
    data = json.loads(result.to_json(tmp_path / "search.json"))
    assert data["index_topk_pattern"] == result.plan.pattern and data["evaluations"] == result.evaluations
    assert [s["num_full"] for s in data["history"]] == [4, 3, 2]
    result.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_init_plan_starts_from_it():
    model = make_model()
    result = search_plan(model, ids(2), num_full=1, init="FFSF", progress=False)
    assert result.history[0].pattern == "FFSF" and result.plan.pattern == "FSSS"
    assert set(result.history[1].candidates) == {1, 3}


def test_cli_writes_plan_search_and_plot(tmp_path):
    from ic_compile.cli import main
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    out = tmp_path / "out"
    rc = main(["search", "--model", "dsa:tiny", "--data", str(text), "--num-full", "2", "--seq", str(SEQ),
               "--max-sequences", "4", "--objective", "kl", "--out", str(out)])
    assert rc == 0
    assert LayerPlan.from_json(out / "plan.json").num_full == 2
    assert json.loads((out / "search.json").read_text())["objective"] == "kl"
    assert (out / "loss.png").exists()


def test_calibration_from_files_is_byte_level(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(50)))
    data = calibration_from_files(tmp_path, seq_len=10, vocab_size=16)
    assert data.shape == (5, 10) and torch.equal(data.flatten(), torch.arange(50) % 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_full=0), "num_full must be between 1 and the number of indexer layers (4), got 0"),
    (dict(num_full=5), "num_full must be between 1 and the number of indexer layers (4), got 5"),
    (dict(ratio=0.0), "ratio must be in (0, 1]"),
    (dict(ratio=1.5), "ratio must be in (0, 1]"),
    (dict(num_full=2, ratio=0.5), "give either num_full or ratio, not both"),
    (dict(num_full=2, objective="ppl"), "objective='ppl' is not one of"),
    (dict(loss_budget=-1.0), "loss_budget must be a number >= 0"),
])
def test_bad_arguments_rejected(kwargs, message):
    with pytest.raises(ValueError) as info:
        search_plan(make_model(), ids(1), progress=False, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("calibration", [torch.zeros(0, SEQ, dtype=torch.long), [], iter([])])
def test_empty_calibration_rejected(calibration):
    with pytest.raises(ValueError, match="empty calibration set"):
        search_plan(make_model(), calibration, num_full=2, progress=False)


def test_bad_calibration_rejected():
    with pytest.raises(ValueError, match="integer token ids"):
        as_batches(torch.rand(2, 8))
    with pytest.raises(PlanError, match="every layer has its indexer"):
        model = init_weights(Transformer(ModelArgs.tiny(index_topk_pattern="FSFS")))
        search_plan(model, ids(1), num_full=1, progress=False)


def test_hf_model_search_equals_backend():
    """HF GlmMoeDsa (forward(input_ids=..., use_cache=False).logits) through the graph evaluator."""
    pytest.importorskip("transformers")
    from ic_compile.tools.models import load_model
    model = load_model("hf-tiny:glm_moe_dsa")
    data = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    result = search_plan(model, data, num_full=2, progress=False)
    assert result.evaluator == "graph" and result.plan.num_full == 2 and result.evaluations == 1 + 3 + 2
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="indexcache", options={"plan": result.plan, "lowering": "eager"})
    with torch.no_grad():
        logits = compiled(input_ids=data, use_cache=False).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 128), data[:, 1:].reshape(-1)).item()
    assert abs(result.loss - expected) < 1e-5


@pytest.mark.parametrize("kwargs", [dict(num_full=1), dict(num_full=2, init="FFSF"), dict(loss_budget=1e9)])
def test_progress_bar_counts_every_evaluation_and_ends_on_the_chosen_plan(capsys, monkeypatch, kwargs):
    """The bar's total is the summary's evaluation count (all-F included), and its last loss= is the
    chosen plan's, not the last candidate's."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # print every update (tqdm reads TQDM_* overrides)
    result = search_plan(make_model(), ids(2), progress=True, **kwargs)
    bar = capsys.readouterr().err
    if "loss_budget" in kwargs:  # no known total: "search lm_loss: 7plan [00:00, ...]"
        assert re.findall(r": (\d+)plan \[", bar)[-1] == str(result.evaluations)
    else:  # "search lm_loss: 100%|...| 7/7 [00:00<00:00, ...]"
        done, total = re.findall(r"\| (\d+)/(\d+) \[", bar)[-1]
        assert int(done) == int(total) == result.evaluations
    assert re.findall(r"loss=([0-9.]+)", bar)[-1] == f"{result.loss:.4f}"
    assert re.findall(r"plan=([FS]+)", bar)[-1] == result.plan.pattern


def test_plot_has_whole_f_layer_ticks_and_a_labelled_candidate_series(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = search_plan(make_model(), ids(2), num_full=1, progress=False)
    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # the real savefig, after noting what is drawn
        ax = fig.axes[0]
        fig.canvas.draw()
        captured["ticks"] = [t for t in ax.get_xticks() if ax.get_xlim()[1] <= t <= ax.get_xlim()[0]]
        captured["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        result.plot(tmp_path / "loss.png")
    finally:
        plt.Figure.savefig = original
    assert captured["ticks"] and all(float(t).is_integer() for t in captured["ticks"])
    assert captured["labels"] == ["candidates (one more layer made S)", "greedy path (chosen plan per step, lm_loss)",
                                  "all F"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
