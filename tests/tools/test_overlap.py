"""Cross-layer top-k overlap and the uniform / overlap baseline plans (ic_compile.tools.overlap)."""
import itertools
import json

import pytest
import torch

from ic_compile.tools.overlap import _set_jaccard, collect_topk, overlap_plan, topk_overlap, uniform_plan
from ic_compile.plan import LayerPlan
from ic_compile.tools.search import search_plan
from ic_compile.dsa_model import ModelArgs, Transformer, init_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0):
    return init_weights(Transformer(ModelArgs.tiny()), seed=seed).eval()


def ids(n=2, seq=20, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_set_jaccard_matches_python_sets():
    gen = torch.Generator().manual_seed(0)
    a = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(30)])
    b = torch.stack([torch.randperm(12, generator=gen)[:5] for _ in range(30)])
    expected = [len(set(x.tolist()) & set(y.tolist())) / len(set(x.tolist()) | set(y.tolist()))
                for x, y in zip(a, b)]
    assert torch.allclose(_set_jaccard(a, b), torch.tensor(expected, dtype=torch.float64))


def test_topk_overlap_matches_brute_force():
    model, data = make_model(), ids()
    matrix = topk_overlap(model, data)
    assert matrix.shape == (4, 4) and torch.allclose(matrix, matrix.T)
    assert torch.allclose(torch.diagonal(matrix), torch.ones(4, dtype=torch.float64))
    topk = collect_topk(model, data)
    k = topk[0].shape[-1]
    for i, j in [(0, 1), (1, 3)]:
        values = []
        for b in range(data.shape[0]):
            for s in range(data.shape[1]):
                if s + 1 <= k:  # only queries with more than k allowed keys count
                    continue
                x, y = set(topk[i][b, s].tolist()), set(topk[j][b, s].tolist())
                values.append(len(x & y) / len(x | y))
        assert abs(matrix[i, j].item() - sum(values) / len(values)) < 1e-12
    assert ((matrix >= 0) & (matrix <= 1)).all()


def test_short_sequences_rejected():
    with pytest.raises(ValueError, match="more than top-k allowed keys"):
        topk_overlap(make_model(), ids(seq=8))


def test_uniform_plan():
    assert uniform_plan(8, 2).pattern == "FSSSFSSS"
    assert uniform_plan(8, 1).pattern == "FSSSSSSS"
    assert uniform_plan(4, 4).pattern == "FFFF"
    assert uniform_plan(6, 4).num_full == 4
    with pytest.raises(ValueError, match="num_full must be between 1 and num_layers"):
        uniform_plan(4, 0)


def _score(matrix, pattern):
    plan = LayerPlan(pattern)
    return sum(matrix[src, l] for l, src in enumerate(plan.sources()) if l != src)


def test_overlap_plan_is_optimal():
    gen = torch.Generator().manual_seed(3)
    m = torch.rand(7, 7, generator=gen, dtype=torch.float64)
    m = (m + m.T) / 2
    for num_full in range(1, 8):
        plan = overlap_plan(m, num_full)
        assert plan.num_full == num_full
        best = max(_score(m, "F" + "".join(rest)) for rest in itertools.product("FS", repeat=6)
                   if 1 + "".join(rest).count("F") == num_full)
        assert abs(_score(m, plan.pattern) - best) < 1e-12
    with pytest.raises(ValueError, match="num_full must be between 1"):
        overlap_plan(m, 8)


def test_overlap_plan_initialises_search():
    model, data = make_model(), ids()
    init = overlap_plan(topk_overlap(model, data), 3)
    result = search_plan(model, data, num_full=2, init=init, progress=False)
    assert result.history[0].pattern == init.pattern and result.plan.num_full == 2


def test_cli_writes_json_and_heatmap(tmp_path):
    from ic_compile.cli import main
    assert main(["overlap", "--model", "dsa:tiny", "--seq", "20", "--max-sequences", "2", "--num-full", "2",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "overlap.json").read_text())
    assert len(report["matrix"]) == 4 and report["uniform_plan"] == "FSFS"
    assert LayerPlan(report["overlap_plan"]).num_full == 2
    assert (tmp_path / "overlap.png").read_bytes()[:4] == b"\x89PNG"


def test_hf_model_overlap():
    pytest.importorskip("transformers")
    from ic_compile.tools.models import load_model
    model = load_model("hf-tiny:glm_moe_dsa")  # index_topk 4
    matrix = topk_overlap(model, torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert matrix.shape == (4, 4) and torch.allclose(torch.diagonal(matrix), torch.ones(4, dtype=torch.float64))
    assert ((matrix >= 0) & (matrix <= 1)).all()
