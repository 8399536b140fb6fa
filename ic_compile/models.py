"""Model specs for the CLI: how `ic ... --model SPEC` builds a model.

SPEC is one of
  dsa:NAME[:PATTERN]       the reference model of examples/dsa_model.py (NAME: tiny, small, ...)
  hf:CONFIG.json           an HF transformers model built from a config file (random weights)
  hf-tiny:glm_moe_dsa      a tiny HF GlmMoeDsa / deepseek_v32 with random weights
  ckpt:DIR                 a checkpoint written by examples/train_dsa.py (config.json + model.safetensors)
  MODULE:FUNCTION          any importable factory returning (model, example_inputs) or a model
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
               num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
               qk_nope_head_dim=16, index_topk=4, index_head_dim=16, index_n_heads=2,
               first_k_dense_replace=1, max_position_embeddings=256)


MODEL_HELP = "dsa:NAME | hf:CONFIG.json | hf-tiny:glm_moe_dsa | ckpt:DIR | MODULE:FUNCTION"


def vocab_size(model) -> int:
    """Vocabulary of an HF model (config) or of the reference model (args); bytes (256) otherwise."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return config.vocab_size
    return getattr(getattr(model, "args", None), "vocab_size", 256)


def import_examples_module(name: str = "dsa_model"):
    """examples/<name>.py from a source checkout (examples are not installed)."""
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "examples" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the reference model lives in the repository's "
                                "examples/ folder; run from a source checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_model(spec: str, seed: int = 0) -> torch.nn.Module:
    kind, _, rest = spec.partition(":")
    torch.manual_seed(seed)
    if kind == "dsa":
        dsa = import_examples_module()
        name, _, pattern = rest.partition(":")
        args = dsa.ModelArgs.from_name(name or "tiny", **({"index_topk_pattern": pattern} if pattern else {}))
        return dsa.init_weights(dsa.Transformer(args), seed).eval()
    if kind == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(rest)
        return AutoModelForCausalLM.from_config(config).eval()
    if kind == "hf-tiny":
        return _hf_tiny(rest or "glm_moe_dsa")
    if kind == "ckpt":
        return load_checkpoint(rest)
    module = importlib.import_module(kind)
    return getattr(module, rest)()


def _hf_tiny(model_type: str) -> torch.nn.Module:
    import transformers
    classes = {"glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
               "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM")}
    if model_type not in classes:
        raise ValueError(f"hf-tiny:{model_type}: known types are {sorted(classes)}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    return getattr(transformers, classes[model_type][1])(config_cls(**HF_TINY, n_group=1, topk_group=1)).eval()


def load_checkpoint(directory: str) -> torch.nn.Module:
    """config.json ({"model_args": {...}}) + model.safetensors written by examples/train_dsa.py."""
    from safetensors.torch import load_file
    dsa = import_examples_module()
    config = json.loads((Path(directory) / "config.json").read_text())
    model = dsa.Transformer(dsa.ModelArgs(**config["model_args"]))
    model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")), strict=False)
    return model.eval()
