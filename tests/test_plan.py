import json

import pytest

from ic_compile.plan import LayerPlan, PlanError


def test_pattern_sources_and_counts():
    plan = LayerPlan.from_pattern("F S S F s")
    assert plan.pattern == "FSSFS" and plan.num_full == 2
    assert plan.sources() == [0, 0, 0, 3, 3]


@pytest.mark.parametrize("layers,freq,offset", [(8, 4, 2), (12, 3, 1), (10, 2, 3), (6, 1, 2), (47, 4, 2)])
def test_freq_matches_hf_config(layers, freq, offset):
    transformers = pytest.importorskip("transformers")
    config = transformers.GlmMoeDsaConfig(num_hidden_layers=layers, index_topk_freq=freq,
                                          index_skip_topk_offset=offset)
    expected = "".join("F" if t == "full" else "S" for t in config.indexer_types)
    assert LayerPlan.from_freq(layers, freq, offset).pattern == expected


def test_round_trip_through_hf_config_and_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    plan = LayerPlan.from_pattern("FSSFSFFS")
    config = transformers.GlmMoeDsaConfig(num_hidden_layers=8, **plan.to_hf_overrides())
    assert "".join("F" if t == "full" else "S" for t in config.indexer_types) == plan.pattern
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert json.loads(path.read_text())["index_topk_pattern"] == "FSSFSFFS"
    assert LayerPlan.coerce(str(path)) == plan
    assert LayerPlan.coerce({"freq": 4}, num_layers=8) == LayerPlan.from_freq(8, 4)
    assert LayerPlan.from_pattern(["full", "shared"]).pattern == "FS"


@pytest.mark.parametrize("pattern,message", [
    ("FSXQ", r"unknown characters \['Q', 'X'\]"),
    ("SFFF", "first indexer layer must be 'F'"),
    ("", "empty plan"),
])
def test_bad_patterns(pattern, message):
    with pytest.raises(PlanError, match=message):
        LayerPlan.from_pattern(pattern)


def test_bad_freq_and_json(tmp_path):
    with pytest.raises(PlanError, match="first indexer layer must be 'F'"):
        LayerPlan.from_freq(10, 2, offset=0)  # HF builds this config, but layer 0 would have no source
    with pytest.raises(PlanError, match="freq must be >= 1"):
        LayerPlan.from_freq(8, 0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": 3}')
    with pytest.raises(PlanError, match="no 'index_topk_pattern' key"):
        LayerPlan.from_json(bad)
