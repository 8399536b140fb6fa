"""Multi-layer indexer distillation (ic_compile.tools.training) and the training example."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ic_compile.errors import IndexCacheError
from ic_compile.reference import shared_indexer_hooks
from ic_compile.tools.training import (collect_distillation_inputs, indexer_parameters,
                                 multi_layer_distillation_loss, serving_groups)

REPO = Path(__file__).resolve().parents[2]
from ic_compile.dsa_model import ModelArgs, Transformer, init_weights  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def causal_probs(B, H, S, gen):
    """Random attention probabilities [B, H, S, S], zero above the causal diagonal."""
    logits = torch.randn(B, H, S, S, generator=gen, dtype=torch.float64)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def small_case(n_layers=3, B=2, H=2, S=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = {l: causal_probs(B, H, S, gen) for l in range(n_layers)}
    scores = {l: torch.randn(B, S, S, generator=gen, dtype=torch.float64) for l in range(n_layers)}
    return scores, probs


def loop_loss(scores, probs, pattern, topk=None):
    """The definition, with explicit Python loops over layers, queries and keys."""
    B, H, S, T = probs[0].shape
    layer_losses = []
    for f, role in enumerate(pattern):
        if role != "F":
            continue
        group = [f]
        for l in range(f + 1, len(pattern)):
            if pattern[l] == "F":
                break
            group.append(l)
        kls = []
        for b in range(B):
            for s in range(S):
                keys = [t for t in range(T) if t <= s]
                if topk is not None:
                    keys = [t for t in topk[f][b, s].tolist() if t <= s]
                target = {}
                for t in keys:
                    total = 0.0
                    for l in group:
                        row_sum = sum(float(probs[l][b, h, s, u]) for h in range(H) for u in range(T))
                        total += sum(float(probs[l][b, h, s, t]) for h in range(H)) / row_sum
                    target[t] = total / len(group)
                norm = sum(target.values())
                target = {t: v / norm for t, v in target.items()}
                z = sum(math.exp(float(scores[f][b, s, t])) for t in keys)
                kl = sum(p * (math.log(p) - (float(scores[f][b, s, t]) - math.log(z)))
                         for t, p in target.items() if p > 0)
                kls.append(kl)
        layer_losses.append(sum(kls) / len(kls))
    return sum(layer_losses) / len(layer_losses)


@pytest.mark.parametrize("pattern", ["FSS", "FSF", "FFF"])
def test_dense_loss_matches_hand_computation(pattern):
    scores, probs = small_case()
    loss = multi_layer_distillation_loss(scores, probs, pattern)
    assert abs(loss.item() - loop_loss(scores, probs, pattern)) < 1e-10


def test_sparse_loss_matches_hand_computation():
    scores, probs = small_case(S=5)
    gen = torch.Generator().manual_seed(1)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    # like the indexer: top-3 of causally masked scores (early queries also pick masked keys)
    topk = {f: torch.rand(2, 5, 5, generator=gen).masked_fill(~causal, -1.0).topk(3, dim=-1).indices
            for f in (0, 2)}
    # the S layer 1 attends only to layer 0's selected keys (plus causality)
    for l, f in ((0, 0), (1, 0), (2, 2)):
        keep = torch.zeros(2, 5, 5, dtype=torch.bool).scatter_(-1, topk[f], True)
        keep &= torch.ones(5, 5, dtype=torch.bool).tril()
        probs[l] = probs[l].masked_fill(~keep[:, None], 0.0)
        probs[l] = probs[l] / probs[l].sum(-1, keepdim=True)
    loss = multi_layer_distillation_loss(scores, probs, "FSF", topk_indices=topk)
    assert abs(loss.item() - loop_loss(scores, probs, "FSF", topk)) < 1e-10


def test_single_layer_groups_equal_deepseek_warmup_kl():
    scores, probs = small_case(n_layers=2)
    singles = []
    for f in (0, 1):
        target = probs[f].sum(1)
        target = target / target.sum(-1, keepdim=True)
        allowed = torch.ones(4, 4, dtype=torch.bool).tril()
        log_q = scores[f].masked_fill(~allowed, float("-inf")).log_softmax(-1)
        kl = torch.where(target > 0, target * (target.log() - log_q), torch.zeros_like(target)).sum(-1)
        singles.append(kl.mean())
    loss = multi_layer_distillation_loss(scores, probs, "FF")
    assert torch.allclose(loss, torch.stack(singles).mean())
    one = multi_layer_distillation_loss({0: scores[0]}, {0: probs[0]}, "F")
    assert torch.allclose(one, singles[0])
    assert serving_groups("FSSFS") == {0: [0, 1, 2], 3: [3, 4]}


def test_loss_is_zero_when_indexer_matches_target():
    _, probs = small_case(n_layers=1)
    target = probs[0].sum(1) / probs[0].sum(1).sum(-1, keepdim=True)
    scores = {0: target.clamp_min(1e-300).log()}
    assert multi_layer_distillation_loss(scores, probs, "F").abs().item() < 1e-10


def tiny_model(seed=0):
    return init_weights(Transformer(ModelArgs.tiny()), seed=seed)


@pytest.mark.parametrize("dense", [True, False])
def test_gradient_reaches_only_indexer_parameters(dense):
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    inputs = collect_distillation_inputs(model, ids, "FSFS", dense=dense)
    assert sorted(inputs.indexer_scores) == [0, 2] and sorted(inputs.attention_probs) == [0, 1, 2, 3]
    loss = multi_layer_distillation_loss(inputs.indexer_scores, inputs.attention_probs, "FSFS",
                                         topk_indices=None if dense else inputs.topk_indices)
    loss.backward()
    indexer = {id(p) for p in indexer_parameters(model)}
    graded = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    others = [name for name, p in model.named_parameters() if id(p) not in indexer and p.grad is not None]
    assert not others, others
    assert graded and all(".indexer." in name for name in graded)
    assert {n.split(".")[1] for n in graded} == {"0", "2"}  # the S layers' indexers are not used


def test_forward_aux_matches_model_forward_under_the_plan():
    model = tiny_model().eval()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for pattern in ("FFFF", "FSSF"):
            logits, aux = model.forward_aux(ids, pattern=pattern)
            with shared_indexer_hooks(model, pattern):
                expected = model(ids)
            assert torch.allclose(logits, expected, atol=1e-5)
            assert sorted(aux["topk"]) == [i for i, r in enumerate(pattern) if r == "F"]


@pytest.mark.parametrize("plan, kwargs, message", [
    ("FSF", {}, "plan 'FSF' has 3 layers but attention_probs has 4"),
    ("SFFF", {}, "the first indexer layer must be 'F'"),
    ("FFXF", {}, "unknown characters"),
    (None, {}, "plan is required"),
    ("FSFF", dict(drop_scores=2), "indexer_scores has no entry for F layers [2]"),
    ("FSFF", dict(probs_keys=[0, 1, 2, 5]), "one entry per layer 0..3"),
    ("FSFF", dict(topk=torch.zeros(2, 4, 2, dtype=torch.long)), "must be a dict"),
    ("FSFF", dict(mask=torch.ones(4, 4)), "mask must be bool"),
])
def test_bad_arguments_raise_clear_errors(plan, kwargs, message):
    scores, probs = small_case(n_layers=4)
    if "drop_scores" in kwargs:
        scores.pop(kwargs["drop_scores"])
    if "probs_keys" in kwargs:
        probs = dict(zip(kwargs["probs_keys"], probs.values()))
    with pytest.raises(IndexCacheError) as info:  # PlanError for the plan, TrainingInputError otherwise
        multi_layer_distillation_loss(scores, probs, plan, mask=kwargs.get("mask"),
                                      topk_indices=kwargs.get("topk"))
    assert message in str(info.value)


def test_train_example_tiny_writes_loadable_checkpoint(tmp_path):
    """The training example end to end at minimum size (all stages, 1-2 steps each)."""
    from ic_compile.tools.models import load_checkpoint
    cmd = [sys.executable, str(REPO / "examples" / "train_dsa.py"), "--tiny", "--out", str(tmp_path),
           "--layers", "4", "--max-files", "30", "--dense-steps", "2", "--warmup-steps", "1",
           "--sparse-steps", "1", "--finetune-steps", "1", "--eval-sequences", "2", "--calib-sequences", "2",
           "--log-every", "0", "--results"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["n_layers"] == 4 and len(config["data"]["hash"]) == 64
    assert set(config["recipe"]["stages"]) == {"dense", "warmup", "sparse"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["all_F"]) == {"code", "prose"}
    assert [r["fraction"] for r in results["plans"]] == ["1/2", "1/4", "1/8"]
    assert results["plans"][1]["uniform"]["plan"] == "FSSS"
    assert {"greedy_code_calibrated", "greedy_prose_calibrated", "overlap_code_calibrated"} <= set(results["plans"][0])
    assert {"all_F", "training_free_uniform_1/4", "training_aware_uniform_1/4"} <= set(results["finetune"])
    model = load_checkpoint(str(tmp_path))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_distill_example_lowers_the_loss_it_optimises(capsys):
    """examples/distill_example.py: same start, same batches; the run with the distillation term ends
    with a lower held-out distillation loss than the LM-only run, and says what each number is."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("distill_example", REPO / "examples" / "distill_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--steps", "12", "--plan", "FSSF"])
    assert results["LM + distill"][1] < 0.5 * results["LM only"][1]
    assert results["LM only"][0] < results["start"][0]  # the LM loss both runs optimise falls
    printed = capsys.readouterr().out
    assert "distillation loss (only the 2nd)" in printed and "LM loss (both optimise it)" in printed
