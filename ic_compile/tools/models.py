"""Model specs for the CLI: how `ic ... --model SPEC` builds a model.

SPEC is one of
  dsa:NAME[:PATTERN]       the reference model of ic_compile/dsa_model.py (NAME: tiny, small, ...)
  hf:CONFIG.json           an HF transformers model built from a config file (random weights)
  hf-tiny:glm_moe_dsa      a tiny HF GlmMoeDsa / deepseek_v32 with random weights
  ckpt:DIR                 a checkpoint written by examples/train_dsa.py (config.json + model.safetensors)
  MODULE:FUNCTION          a factory returning a model or (model, example_inputs) (the CLI builds its
                           own inputs from --seq/--batch); MODULE is imported from sys.path, then the
                           working directory
A spec that cannot be built raises ModelSpecError, whose message names the spec and the fix.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from ..errors import IndexCacheError

HF_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
               num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
               qk_nope_head_dim=16, index_topk=4, index_head_dim=16, index_n_heads=2,
               first_k_dense_replace=1, max_position_embeddings=256)


def vocab_size(model) -> int:
    """Vocabulary of an HF model (config) or of the reference model (args); bytes (256) otherwise."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return config.vocab_size
    return getattr(getattr(model, "args", None), "vocab_size", 256)


class ModelSpecError(IndexCacheError, ValueError):
    """A `--model SPEC` that cannot be turned into a model; the message names the spec and the fix."""


FORMS = ("dsa:NAME", "hf:CONFIG.json", "hf-tiny:glm_moe_dsa", "ckpt:DIR", "MODULE:FUNCTION")


def load_model(spec: str, seed: int = 0) -> torch.nn.Module:
    """The model a `--model SPEC` names (see the module docstring), in eval mode."""
    kind, colon, rest = spec.partition(":")
    if not colon or not kind:
        raise ModelSpecError(f"--model {spec!r} is not a model spec: use one of {', '.join(FORMS)} "
                             "(e.g. --model dsa:tiny)")
    torch.manual_seed(seed)
    if kind == "dsa":
        return _dsa(spec, rest, seed)
    if kind == "hf":
        return _hf_config(spec, rest)
    if kind == "hf-tiny":
        return _hf_tiny(rest or "glm_moe_dsa")
    if kind == "ckpt":
        return load_checkpoint(rest)
    return _factory(spec, kind, rest)


def _dsa(spec: str, rest: str, seed: int) -> torch.nn.Module:
    from .. import dsa_model as dsa
    name, _, pattern = rest.partition(":")
    try:
        args = dsa.ModelArgs.from_name(name or "tiny", **({"index_topk_pattern": pattern} if pattern else {}))
    except ValueError as exc:  # unknown name, bad pattern: the reference model's own message
        raise ModelSpecError(f"--model {spec}: {exc}") from None
    return dsa.init_weights(dsa.Transformer(args), seed).eval()


def _hf_config(spec: str, path: str) -> torch.nn.Module:
    """hf:CONFIG.json (or a directory holding config.json): the architecture, random weights."""
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    if not config_path.is_file():
        raise ModelSpecError(f"--model {spec}: {str(config_path)!r} does not exist; give the path of an HF "
                             "config.json (or of the directory holding it)")
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(config_path))
        return AutoModelForCausalLM.from_config(config).eval()
    except (OSError, ValueError, KeyError) as exc:  # bad JSON, unknown model_type, no causal-LM class
        raise ModelSpecError(f"--model {spec}: transformers cannot build a causal LM from {str(config_path)!r}: "
                             f"{_first_line(exc)}") from None


def _factory(spec: str, module_name: str, function: str) -> torch.nn.Module:
    """MODULE:FUNCTION, MODULE importable from sys.path or the working directory."""
    if not function:
        raise ModelSpecError(f"--model {spec}: no FUNCTION after the colon; use MODULE:FUNCTION, "
                             "e.g. --model my_models:build (my_models.py in the working directory)")
    _working_directory_importable()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name.split(".")[0] and exc.name != module_name:
            raise ModelSpecError(f"--model {spec}: importing {module_name!r} failed: {exc}") from None
        raise ModelSpecError(f"--model {spec}: no module named {module_name!r} (looked in the working "
                             f"directory {os.getcwd()} and on sys.path); the prefix must be one of "
                             f"{', '.join(f.split(':')[0] + ':' for f in FORMS[:4])} or an importable module"
                             ) from None
    factory = getattr(module, function, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ModelSpecError(f"--model {spec}: module {module_name!r} has no function {function!r}; "
                             f"it defines {found or 'no public functions'}")
    return _model_from(spec, factory())


def _working_directory_importable() -> None:
    """`ic` is a console script, so the working directory is not on sys.path. It is appended, never
    prepended: a folder there (e.g. a checkout's kernels/) must not shadow an installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _model_from(spec: str, made) -> torch.nn.Module:
    """A factory may return the model or (model, example_inputs); the CLI builds its own inputs."""
    if isinstance(made, (tuple, list)) and made and isinstance(made[0], torch.nn.Module):
        made = made[0]
    if not isinstance(made, torch.nn.Module):
        raise ModelSpecError(f"--model {spec}: the factory returned {type(made).__name__}, not a "
                             "torch.nn.Module; return the model or (model, example_inputs)")
    return made.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _hf_tiny(model_type: str) -> torch.nn.Module:
    import transformers
    classes = {"glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
               "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM")}
    if model_type not in classes:
        raise ModelSpecError(f"--model hf-tiny:{model_type}: unknown type; known types are {sorted(classes)}")
    config_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    return model_cls(config_cls(**HF_TINY, n_group=1, topk_group=1)).eval()


def load_checkpoint(directory: str) -> torch.nn.Module:
    """config.json ({"model_args": {...}}) + model.safetensors written by examples/train_dsa.py.
    Loaded strictly: a tensor missing from the file would otherwise run with its random init."""
    from safetensors.torch import load_file
    folder = Path(directory)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelSpecError(f"--model ckpt:{directory}: {str(path)!r} does not exist; a checkpoint "
                                 "directory holds config.json and model.safetensors (examples/train_dsa.py "
                                 "--out DIR writes them)")
    from .. import dsa_model as dsa
    try:
        model_args = dsa.ModelArgs(**json.loads(config_path.read_text())["model_args"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"--model ckpt:{directory}: {str(config_path)!r} does not hold valid "
                             f"\"model_args\" for ic_compile/dsa_model.py: {_first_line(exc)}") from None
    model = dsa.Transformer(model_args)
    state = load_file(str(weights_path))
    check_state_dict(model, state, f"--model ckpt:{directory}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_state_dict(model: torch.nn.Module, state: dict, what: str) -> None:
    """Raise naming every missing / unexpected / mis-shaped tensor (load_state_dict's own error is a
    RuntimeError wall; strict=False would silently keep random weights)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
                    if k in state and tuple(state[k].shape) != tuple(v.shape))
    problems = ([f"missing tensors {missing}"] if missing else []) + (
        [f"unexpected tensors {unexpected}"] if unexpected else []) + (
        [f"shape mismatches {shapes}"] if shapes else [])
    if problems:
        raise ModelSpecError(f"{what}: the weights do not match the model built from config.json: "
                             + "; ".join(problems) + ". Re-save the checkpoint or fix config.json's "
                             "model_args (e.g. index_topk_pattern decides which layers have indexer weights)")
