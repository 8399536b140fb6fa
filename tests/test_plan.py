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


@pytest.mark.parametrize("text,where", [("{bad", "line 1 column 2"), ('{"index_topk_pattern": "FS",}', "line 1 column 29")])
def test_invalid_json_plan_file_is_one_line_naming_the_file(tmp_path, text, where):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        LayerPlan.from_json(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and where in message and "not valid JSON" in message
    with pytest.raises(PlanError, match="not found"):
        LayerPlan.from_json(tmp_path / "missing.json")


def test_overrides_need_both_keys_and_map_over_a_models_indexers():
    plan = LayerPlan.from_pattern("FSSF")
    assert plan.to_hf_overrides() == {"indexer_types": ["full", "shared", "shared", "full"],
                                      "index_topk_pattern": "FSSF"}
    from ic_compile.tools.models import load_model
    assert plan.to_hf_overrides(load_model("hf-tiny:glm_moe_dsa")) == plan.to_hf_overrides()
    # the reference model built with FSFF has indexers on layers 0, 2, 3 only: 3 roles, mapped
    assert LayerPlan.from_pattern("FFS").to_hf_overrides(load_model("dsa:tiny:FSFF"))["index_topk_pattern"] == "FSFS"
    with pytest.raises(PlanError, match="makes decoder layers 1 F, but they have no indexer weights"):
        LayerPlan.from_pattern("FFSS").to_hf_overrides(load_model("dsa:tiny:FSFF"))
    with pytest.raises(PlanError, match="has 2 roles but this model has 3 indexers in 4 decoder layers"):
        LayerPlan.from_pattern("FS").to_hf_overrides(load_model("dsa:tiny:FSFF"))


# ------------------------------------------------------------------ ic plan
def ic_plan(capsys, *argv):
    from ic_compile.cli import main
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ic_plan_prints_each_engines_line(capsys, tmp_path):
    code, out, _ = ic_plan(capsys, "--pattern", "FSSFSSSF", "--out", str(tmp_path / "plan.json"))
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    want = LayerPlan.from_pattern("FSSFSSSF").to_hf_overrides()
    assert json.loads(lines["vLLM"].split("--hf-overrides ", 1)[1].strip("'")) == want
    assert json.loads(lines["SGLang"].split("--json-model-override-args ", 1)[1].strip("'")) == want
    assert {"HF from_pretrained", "HF constructor", "HF DeepSeek-V3.2", "TRT-LLM"} <= set(lines)
    assert LayerPlan.from_json(tmp_path / "plan.json").pattern == "FSSFSSSF"


def test_ic_plan_json_maps_a_checkpoint(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from ic_compile.tools.models import HF_TINY
    config = transformers.GlmMoeDsaConfig(**{**HF_TINY, "num_hidden_layers": 8}, index_topk_freq=4,
                                          index_skip_topk_offset=3)
    config.save_pretrained(tmp_path)
    code, out, _ = ic_plan(capsys, "--pattern", "FSFS", "--config", str(tmp_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["plan"], data["decoder_plan"]) == ("FSFS", "FSFSSSSS")  # layers 0, 1, 2, 6 hold the indexers
    assert data["commands"]["vLLM"].startswith(f"vllm serve {tmp_path} --hf-overrides")
    code, out, err = ic_plan(capsys, "--pattern", "FFFFFFFF", "--config", str(tmp_path))
    assert code == 2 and out == ""
    assert "makes decoder layers 3-5, 7 F, but they have no indexer weights" in err


@pytest.mark.parametrize("bad", ["missing_dir/plan.json", "."])
def test_ic_plan_checks_out_before_printing(capsys, tmp_path, bad):
    code, out, err = ic_plan(capsys, "--pattern", "FSSF", "--out", str(tmp_path / bad))
    assert code == 2 and out == ""
    assert "--out" in err and ("does not exist" in err or "is a directory" in err)
