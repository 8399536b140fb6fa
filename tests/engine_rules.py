"""How each serving engine decides which decoder layers share top-k (S) and which compute it (F),
reimplemented here so that our deploy forms are checked on this machine, where vLLM, SGLang and
TRT-LLM cannot run (CPU only, no engines installed). Each function returns the set of *shared*
decoder layers, as the engines' own helpers do. HF transformers is not reimplemented: the tests run
the installed transformers 5.25 (config classes and modeling) for real.

Sources, read 2026-12 (what was and was not read in released code is in docs/deploy.md):
- vLLM 0.34.0 `vllm/model_executor/models/utils.py:compute_skip_topk_layers`. The released file is
  not in our code index (its stored copies predate the function); the rule below is the one in
  DESIGN.md §9 and it matches, line for line, the copies of that function in vLLM plugins that are
  stored (vllm_fl / vllm_hcu `hy_v4` attention.py, `index_sharing.py`): `indexer_types` first, of
  length num_hidden_layers or a ValueError; else `index_topk_pattern` 'S' by decoder layer (layers
  past its end are F); else `index_topk_freq` + `index_skip_topk_offset` (default 2).
- SGLang 0.5.23 `python/sglang/srt/configs/model_config.py:dsa_layer_skips_topk`. Not stored either;
  DESIGN.md §9's order (indexer_types, pattern, freq+offset; offset default 2, which equals the
  `max(layer - 1, 0) % freq` fallback of the stored copies). A stored SGLang unit test
  (`TestDsaIndexTopkPattern.test_explicit_index_topk_pattern_takes_precedence`) shows a build that
  reads the pattern *before* indexer_types: `sglang_pattern_first_shared_layers` covers that order.
- TRT-LLM: DESIGN.md §9 only (no source read): reads `index_topk_pattern`, else freq+offset, from
  config.json; ignores `indexer_types`; layer 0 is always F.
Engine config loading (DESIGN.md §9): vLLM and SGLang build the HF config from the checkpoint (for
`deepseek_v32` as `DeepseekV3Config`, their own registry entry) and then apply overrides:
`config.update(overrides)` for vLLM's --hf-overrides, `setattr` per key for SGLang's
--json-model-override-args.
"""

from __future__ import annotations

import json
from pathlib import Path


# ------------------------------------------------------------------ loading, as each engine does
def engine_config(directory):
    """The HF config vLLM and SGLang build from a checkpoint directory."""
    from transformers import AutoConfig, DeepseekV3Config
    model_type = json.loads((Path(directory) / "config.json").read_text())["model_type"]
    if model_type == "deepseek_v32":
        return DeepseekV3Config.from_pretrained(directory)
    return AutoConfig.from_pretrained(directory)


def vllm_config(directory, overrides: dict | None = None):
    config = engine_config(directory)
    config.update(overrides or {})  # vLLM --hf-overrides (a dict) after the config is built
    return config


def sglang_config(directory, overrides: dict | None = None):
    config = engine_config(directory)
    for key, value in (overrides or {}).items():  # SGLang --json-model-override-args
        setattr(config, key, value)
    return config


def trtllm_config(directory) -> dict:
    """TRT-LLM reads config.json itself, as a dict."""
    return json.loads((Path(directory) / "config.json").read_text())


# ------------------------------------------------------------------ selection rules
def vllm_shared_layers(config) -> set[int]:
    """vLLM compute_skip_topk_layers."""
    if not hasattr(config, "index_topk"):
        return set()
    num = config.num_hidden_layers
    types = getattr(config, "indexer_types", None)
    if types is not None:
        if len(types) != num:
            raise ValueError(f"indexer_types must contain one entry per hidden layer: expected {num}, got {len(types)}")
        invalid = sorted(set(types) - {"full", "shared"})
        if invalid:
            raise ValueError(f"indexer_types only supports 'full' and 'shared', got {invalid}")
        return {i for i, t in enumerate(types) if t == "shared"}
    return _pattern_or_freq(config, num)


def _pattern_or_freq(config, num: int) -> set[int]:
    freq = getattr(config, "index_topk_freq", 1)
    if not isinstance(freq, int) or freq <= 0:
        raise ValueError(f"index_topk_freq must be a positive integer, got {freq!r}")
    pattern = getattr(config, "index_topk_pattern", None)
    offset = getattr(config, "index_skip_topk_offset", 2)
    if pattern is not None:
        return {i for i in range(min(num, len(pattern))) if pattern[i] == "S"}
    return {i for i in range(num) if max(i - offset + 1, 0) % freq != 0}


def sglang_shared_layers(config) -> set[int]:
    """SGLang dsa_layer_skips_topk over the decoder layers (indexer_types first)."""
    return {i for i in range(config.num_hidden_layers) if _sglang_skips(config, i, pattern_first=False)}


def sglang_pattern_first_shared_layers(config) -> set[int]:
    """The SGLang order seen in a stored unit test: index_topk_pattern before indexer_types."""
    return {i for i in range(config.num_hidden_layers) if _sglang_skips(config, i, pattern_first=True)}


def _sglang_skips(config, layer: int, pattern_first: bool) -> bool:
    role = _sglang_role(config, layer, pattern_first)
    if role is not None:
        return role == "shared"
    freq = int(getattr(config, "index_topk_freq", 1) or 1)
    if freq <= 1:
        return False
    offset = getattr(config, "index_skip_topk_offset", None)
    offset = 2 if offset is None else int(offset)
    return max(layer - offset + 1, 0) % freq != 0


def _sglang_role(config, layer: int, pattern_first: bool) -> str | None:
    """'full'/'shared' from indexer_types or the pattern, whichever is read first; None: use freq."""
    types = getattr(config, "indexer_types", None)
    pattern = getattr(config, "index_topk_pattern", None)
    for source in ([pattern, types] if pattern_first else [types, pattern]):
        if source is None:
            continue
        if layer < len(source):
            return {"f": "full", "full": "full", "s": "shared", "shared": "shared"}[str(source[layer]).lower()]
        if source is pattern:
            return "full"  # a short pattern is padded with F
    return None


def trtllm_shared_layers(config_json: dict) -> set[int]:
    """TRT-LLM: pattern, else freq+offset, from config.json; indexer_types ignored; layer 0 F."""
    num = config_json["num_hidden_layers"]
    pattern = config_json.get("index_topk_pattern")
    if pattern is not None:
        shared = {i for i in range(min(num, len(pattern))) if pattern[i] == "S"}
    else:
        freq = max(int(config_json.get("index_topk_freq") or 1), 1)
        offset = config_json.get("index_skip_topk_offset", 2)
        shared = {i for i in range(num) if max(i - offset + 1, 0) % freq != 0}
    return shared - {0}


def as_pattern(shared: set[int], num_layers: int) -> str:
    return "".join("S" if i in shared else "F" for i in range(num_layers))


ENGINE_RULES = {  # name -> (load the config with overrides, rule)
    "vLLM": (vllm_config, vllm_shared_layers),
    "SGLang": (sglang_config, sglang_shared_layers),
    "SGLang (pattern first)": (sglang_config, sglang_pattern_first_shared_layers),
}


def engine_pattern(engine: str, directory, overrides: dict | None) -> str:
    """What `engine` runs for the checkpoint in `directory` served with `overrides`."""
    load, rule = ENGINE_RULES[engine]
    config = load(directory, overrides)
    return as_pattern(rule(config), config.num_hidden_layers)
