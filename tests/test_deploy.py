"""Deploy forms: every engine, loading a checkpoint the way it does and applying our overrides the way
it does, must run exactly our plan. vLLM/SGLang/TRT-LLM rules are reimplemented in engine_rules.py
(sources cited there); HF transformers 5.25 is run for real."""

import json
import subprocess

import pytest
import torch

from engine_rules import ENGINE_RULES, as_pattern, engine_pattern, trtllm_config, trtllm_shared_layers
from ic_compile.deploy import DecoderLayout, deployment, layout_of
from ic_compile.tools.models import HF_TINY
from ic_compile.plan import LayerPlan, PlanError

transformers = pytest.importorskip("transformers")

PATTERNS = ["FSSFSSSF", "FSFSFSFS", "FFFFFFFF", "FSSSSSSS"]
TINY = {**HF_TINY, "num_hidden_layers": 8, "n_group": 1, "topk_group": 1}
CONFIGS = {  # config.json as shipped (tiny sizes so HF can build the model)
    "GLM-5": {"model_type": "glm_moe_dsa", "architectures": ["GlmMoeDsaForCausalLM"], **TINY},
    "GLM-5.2": {"model_type": "glm_moe_dsa", "architectures": ["GlmMoeDsaForCausalLM"], **TINY,
                "index_topk_freq": 4, "index_skip_topk_offset": 3, "index_topk_pattern": None},
    "DeepSeek-V3.2": {"model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], **TINY},
}
GLM_NAMES = ["GLM-5", "GLM-5.2"]
ENGINES = list(ENGINE_RULES)


def checkpoint(tmp_path, name: str, extra: dict | None = None):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**CONFIGS[name], **(extra or {})}))
    return folder


def hf_built_pattern(config) -> str:
    """What HF's GLM modeling builds: F where a layer has an indexer, S where it has none."""
    torch.manual_seed(0)
    model = transformers.GlmMoeDsaForCausalLM(config)
    return "".join("S" if layer.self_attn.indexer is None else "F" for layer in model.model.layers)


# ------------------------------------------------------------------ vLLM / SGLang: flags on the command line
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_flags_pick_the_plan(tmp_path, engine, name, pattern):
    overrides = LayerPlan.from_pattern(pattern).to_hf_overrides()
    assert engine_pattern(engine, checkpoint(tmp_path, name), overrides) == pattern


def test_pattern_only_flags_are_ignored_for_glm(tmp_path):
    """The form `ic plan` printed before: 10 of 24 vLLM/SGLang cases ran the plan, by coincidence
    where the checkpoint's own schedule equals it; every GLM case with S layers ran something else."""
    hits = {}
    for engine in ["vLLM", "SGLang"]:
        for name in CONFIGS:
            for pattern in PATTERNS:
                ran = engine_pattern(engine, checkpoint(tmp_path, name), {"index_topk_pattern": pattern})
                hits[engine, name, pattern] = ran == pattern
    assert sum(hits.values()) == 10
    assert all(hits[e, "DeepSeek-V3.2", p] for e in ["vLLM", "SGLang"] for p in PATTERNS)
    assert not any(hits[e, n, p] for e in ["vLLM", "SGLang"] for n in GLM_NAMES for p in PATTERNS if "S" in p)


def test_the_printed_flags_are_the_overrides(tmp_path):
    commands = deployment("FSSFSSSF").commands("/ckpt/glm")
    for engine, flag in [("vLLM", "--hf-overrides"), ("SGLang", "--json-model-override-args")]:
        payload = commands[engine].split(f"{flag} '", 1)[1].rstrip("'")
        assert json.loads(payload) == LayerPlan.from_pattern("FSSFSSSF").to_hf_overrides()
        for other in ENGINES:
            assert engine_pattern(other, checkpoint(tmp_path, "GLM-5.2"), json.loads(payload)) == "FSSFSSSF"


# ------------------------------------------------------------------ HF transformers: the printed lines, run
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", GLM_NAMES)
@pytest.mark.parametrize("form", ["HF from_pretrained", "HF constructor"])
def test_hf_lines_build_the_plan(tmp_path, form, name, pattern):
    folder = checkpoint(tmp_path, name)
    line = deployment(pattern).commands(str(folder))[form]
    scope = {"GlmMoeDsaConfig": transformers.GlmMoeDsaConfig}
    exec(line, scope)
    config = scope["config"]
    if form == "HF constructor":  # the printed line gives the plan; the user adds the model's sizes
        config = transformers.GlmMoeDsaConfig(**{**CONFIGS[name], **{"indexer_types": config.indexer_types}})
    assert "".join("F" if t == "full" else "S" for t in config.indexer_types) == pattern
    assert hf_built_pattern(config) == pattern


def test_hf_from_pretrained_ignores_a_pattern_kwarg(tmp_path):
    """Why the HF line passes indexer_types: from_dict only sets kwargs that are already attributes,
    after __post_init__ has filled indexer_types from the checkpoint's schedule."""
    config = transformers.GlmMoeDsaConfig.from_pretrained(checkpoint(tmp_path, "GLM-5.2"), index_topk_pattern="FSFSFSFS")
    assert config.indexer_types == ["full"] * 3 + ["shared"] * 3 + ["full", "shared"]


def test_hf_line_for_deepseek_v32_compiles_with_the_backend(tmp_path):
    """HF's DeepseekV32 runs every indexer whatever the config says: the plan goes to our backend."""
    dep = deployment("FSFSFSFS", checkpoint(tmp_path, "DeepSeek-V3.2"))
    assert dep.commands()["HF transformers"] == ('model = torch.compile(model, backend="indexcache", '
                                                 'options={"plan": "FSFSFSFS"})')
    assert "HF from_pretrained" not in dep.commands()


# ------------------------------------------------------------------ TRT-LLM: config.json edit, run
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trtllm_config_edit_picks_the_plan_for_every_engine(tmp_path, name, pattern):
    folder = checkpoint(tmp_path, name)
    line = deployment(pattern).commands(str(folder))["TRT-LLM"]
    subprocess.run(["bash", "-c", line], check=True)
    edited = trtllm_config(folder)
    assert as_pattern(trtllm_shared_layers(edited), 8) == pattern
    # the edited checkpoint, served with no flags, runs the plan in the other engines and HF too
    for engine in ENGINES:
        assert engine_pattern(engine, folder, None) == pattern
    if name in GLM_NAMES:
        assert hf_built_pattern(transformers.AutoConfig.from_pretrained(folder)) == pattern


def test_trtllm_edit_without_the_pattern_keeps_the_schedule(tmp_path):
    """TRT-LLM ignores indexer_types: an edit that set only it would leave GLM-5.2's freq schedule."""
    edited = {**CONFIGS["GLM-5.2"], "indexer_types": ["full"] * 8}
    assert as_pattern(trtllm_shared_layers(edited), 8) == "FFFSSSFS"


# ------------------------------------------------------------------ index spaces: indexers -> decoder layers
def test_glm52_layout_and_mapping(tmp_path):
    folder = checkpoint(tmp_path, "GLM-5.2")
    layout = layout_of(folder)
    assert layout == DecoderLayout(8, (0, 1, 2, 6), "glm_moe_dsa")
    dep = deployment("FSSF", folder)  # one role per indexer of the checkpoint
    assert dep.decoder_plan.pattern == "FSSSSSFS"
    for engine in ENGINES:
        assert engine_pattern(engine, folder, dep.overrides) == "FSSSSSFS"
    config = transformers.AutoConfig.from_pretrained(folder)
    assert hf_built_pattern(transformers.GlmMoeDsaConfig(**{**config.to_dict(), **dep.overrides})) == "FSSSSSFS"


def test_layout_from_a_model_matches_its_config(tmp_path):
    from ic_compile.tools.models import load_model
    path = checkpoint(tmp_path, "GLM-5.2") / "config.json"
    assert layout_of(load_model(f"hf:{path}")) == layout_of(path)
    assert layout_of(load_model("dsa:tiny:FSFF")) == DecoderLayout(4, (0, 2, 3), None)


def test_plan_needing_missing_indexer_weights_is_refused(tmp_path):
    folder = checkpoint(tmp_path, "GLM-5.2")
    with pytest.raises(PlanError, match=r"makes decoder layers 4 F, but they have no indexer weights \(this "
                                        r"model has indexers on decoder layers 0-2, 6 only\).*e\.g\. 'FSFF'"):
        deployment("FSFSFSFS", folder)
    assert deployment("FSFSSSFS", folder).decoder_plan.pattern == "FSFSSSFS"  # only F on indexer layers: fine
    with pytest.raises(PlanError, match=r"has 5 roles but this model has 4 indexers in 8 decoder layers.*"
                                        r"give 4 \(one per indexer\) or 8 \(one per decoder layer\) roles"):
        deployment("FSSFS", folder)
    with pytest.raises(PlanError, match="DeepSeek-V4 is not supported"):
        layout_of({"model_type": "deepseek_v4"})


def test_checkpoint_weights_decide_the_layout(tmp_path):
    """A checkpoint directory's weight map says which layers ship indexer weights (MTP layers aside)."""
    folder = checkpoint(tmp_path, "GLM-5")
    names = [f"model.layers.{i}.self_attn.indexer.wk.weight" for i in (0, 4, 8)]  # 8: the MTP layer
    names += [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(8)]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "a")}))
    assert layout_of(folder).indexer_layers == (0, 4)
    assert deployment("FS", folder).decoder_plan.pattern == "FSSSSSSS"
    with pytest.raises(PlanError, match="decoder layers 1 F"):
        deployment("FFSSFSSS", folder)


def test_docs_show_what_ic_plan_prints(capsys):
    """docs/deploy.md's first example is the command's real output."""
    from pathlib import Path

    from ic_compile.cli import main
    assert main(["plan", "--pattern", "FSSFSSSF"]) == 0
    printed = capsys.readouterr().out
    docs = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    block = docs.split("$ ic plan --pattern FSSFSSSF\n", 1)[1].split("```", 1)[0]
    assert block == printed


def test_single_safetensors_file_decides_the_layout(tmp_path):
    from safetensors.torch import save_file
    folder = checkpoint(tmp_path, "GLM-5")
    tensors = {f"model.layers.{i}.self_attn.indexer.wk.weight": torch.zeros(1) for i in (0, 1, 2, 6)}
    save_file(tensors, str(folder / "model.safetensors"))
    assert layout_of(folder).indexer_layers == (0, 1, 2, 6)
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(PlanError, match=r"hold no '\.indexer\.' tensor"):
        layout_of(folder)
