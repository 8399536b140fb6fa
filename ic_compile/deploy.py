"""Deploy a plan: the config overrides and command lines that make vLLM, SGLang, HF transformers and
TRT-LLM run exactly a given F/S plan (docs/deploy.md).

Two index spaces meet here. Our plans have one role per *indexer* the model holds, in model order;
engines read one role per *decoder layer*. They differ when some decoder layers hold no indexer:
GLM-5.2-style checkpoints (config `indexer_types` "shared": HF and the engines build no indexer
there and the checkpoint ships no weights for one), or the reference model built with a pattern.
`DecoderLayout` says which decoder layers hold an indexer; `deployment()` maps a plan onto the
decoder layers and refuses a plan that needs indexer weights the model does not have.

    dep = deployment("FSSF", model_or_config)        # or deployment("FSSFSSSF") for 8 decoder layers
    dep.overrides     # {"indexer_types": [...], "index_topk_pattern": "..."}
    dep.commands()    # {"vLLM": "vllm serve MODEL --hf-overrides '...'", ...}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .plan import FULL, SHARED, LayerPlan, PlanError

ROLE_WORDS = {FULL: "full", SHARED: "shared"}
# model types whose HF modeling builds no indexer on a layer whose config says "shared"
# (transformers 5.25 modeling_glm_moe_dsa: `self.indexer = None if self.skip_topk else ...`)
SKIPS_SHARED_INDEXERS = {"glm_moe_dsa"}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class DecoderLayout:
    """Which decoder layers of a model hold a lightning indexer (with its weights)."""

    num_layers: int
    indexer_layers: tuple[int, ...]  # decoder layer of each indexer, in model order
    model_type: str | None = None    # HF model_type; None for models without an HF config

    def __post_init__(self):
        bad = [i for i in self.indexer_layers if not 0 <= i < self.num_layers]
        if bad or list(self.indexer_layers) != sorted(set(self.indexer_layers)):
            raise PlanError(f"indexer layers {list(self.indexer_layers)} are not distinct increasing "
                            f"decoder layers of 0..{self.num_layers - 1}")

    def describe(self) -> str:
        if len(self.indexer_layers) == self.num_layers:
            return f"{self.num_layers} decoder layers, each with an indexer"
        return (f"{len(self.indexer_layers)} indexers in {self.num_layers} decoder layers, "
                f"on layers {_ranges(self.indexer_layers)}")


# ------------------------------------------------------------------ layouts
def layout_of(source) -> DecoderLayout:
    """Layout of an `nn.Module` (its indexer modules), a transformers config, a config dict, or a
    path to a config.json / checkpoint directory (whose safetensors index, when present, says
    which layers ship indexer weights)."""
    if isinstance(source, DecoderLayout):
        return source
    if isinstance(source, (str, Path)):
        return _layout_from_path(Path(source))
    if hasattr(source, "named_modules"):
        return _layout_from_module(source)
    return _layout_from_config(_as_hf_config(source))


def _layout_from_module(model) -> DecoderLayout:
    from .reference import find_indexer_modules  # torch-level import, only when a module is given
    indexers = {id(m) for m in find_indexer_modules(model)}
    layers = [int(match.group(1)) for name, module in model.named_modules()
              if id(module) in indexers and (match := _LAYER_INDEX.search(name + "."))]
    if not layers:
        raise PlanError(f"{type(model).__name__} has no indexer module under a `layers.N` module: "
                        "nothing to deploy a plan onto")
    config = getattr(model, "config", None)
    num = getattr(config, "num_hidden_layers", None) or getattr(getattr(model, "args", None), "n_layers", None)
    if num is None:
        raise PlanError(f"{type(model).__name__}: cannot tell its number of decoder layers (no "
                        "config.num_hidden_layers or args.n_layers); pass its config instead")
    # MTP/next-n layers (index >= num_hidden_layers) are outside every engine's pattern
    return DecoderLayout(num, tuple(sorted(i for i in layers if i < num)), getattr(config, "model_type", None))


def _as_hf_config(config):
    """A transformers config object from a dict (built as AutoConfig would) or the object itself."""
    if not isinstance(config, dict):
        return config
    from transformers import AutoConfig
    data = dict(config)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise PlanError("config dict has no 'model_type'; give the checkpoint's config.json contents")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise PlanError(f"config model_type {model_type!r}: transformers cannot build it ({exc}); "
                        "give the config of a DSA model (glm_moe_dsa, deepseek_v32, ...)") from None


def _layout_from_config(config) -> DecoderLayout:
    model_type = getattr(config, "model_type", None)
    if model_type == "deepseek_v4":
        raise PlanError(
            "DeepSeek-V4 is not supported by `ic plan`'s deploy forms: its indexers sit only on "
            "compressed-sparse layers and vllm-ascend indexes a plan per such layer behind "
            "`use_index_cache: true` (docs/deploy.md); no engine rule for it was verified here")
    num = getattr(config, "num_hidden_layers", None)
    if not num:
        raise PlanError(f"{type(config).__name__} has no num_hidden_layers: not a decoder-only DSA config")
    if getattr(config, "index_topk", None) is None and getattr(config, "indexer_types", None) is None:
        raise PlanError(f"{type(config).__name__} ({model_type}) has no index_topk: not a "
                        "DeepSeek-Sparse-Attention model, there is no indexer to share")
    types = getattr(config, "indexer_types", None)
    if model_type in SKIPS_SHARED_INDEXERS and types is not None:
        layers = tuple(i for i, t in enumerate(types[:num]) if t == "full")
    else:
        layers = tuple(range(num))
    return DecoderLayout(num, layers, model_type)


def _layout_from_path(path: Path) -> DecoderLayout:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise PlanError(f"{path}: no config.json there; give a checkpoint directory or its config.json")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"{config_file}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    layout = _layout_from_config(_as_hf_config(data))
    shipped = _layers_with_indexer_weights(config_file.parent, layout.num_layers)
    if shipped is None:
        return layout
    if not shipped:
        raise PlanError(f"{config_file.parent}: the checkpoint's weights hold no '.indexer.' tensor on "
                        f"decoder layers 0..{layout.num_layers - 1}: no indexer to share")
    return DecoderLayout(layout.num_layers, shipped, layout.model_type)


def _layers_with_indexer_weights(directory: Path, num_layers: int) -> tuple[int, ...] | None:
    """Decoder layers whose indexer weights the checkpoint ships, from the weight names of
    model.safetensors.index.json or model.safetensors' header (no tensor is read). None when the
    folder has neither."""
    names = _weight_names(directory)
    if names is None:
        return None
    layers = {int(m.group(1)) for n in names if ".indexer." in n and (m := _LAYER_INDEX.search(n))}
    return tuple(sorted(i for i in layers if i < num_layers))  # MTP layers (>= num_layers) aside


def _weight_names(directory: Path):
    index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index.is_file():
        return list(json.loads(index.read_text()).get("weight_map", {}))
    if single.is_file():
        from safetensors import safe_open
        with safe_open(str(single), "pt") as handle:
            return list(handle.keys())
    return None


# ------------------------------------------------------------------ plan -> decoder layers
def to_decoder_plan(plan, layout: DecoderLayout | None = None) -> LayerPlan:
    """The plan with one role per decoder layer. `plan` has one role per indexer of `layout` (our
    index space) or one per decoder layer; without a layout it must already be the latter."""
    plan = LayerPlan.coerce(plan, len(layout.indexer_layers) if layout else None)
    if layout is None or len(layout.indexer_layers) == layout.num_layers:
        if layout is not None and len(plan) != layout.num_layers:
            raise _length_error(plan, layout)
        return plan
    if len(plan) == len(layout.indexer_layers):
        return _spread(plan, layout)
    if len(plan) == layout.num_layers:
        _check_weights(plan, layout)
        return plan
    raise _length_error(plan, layout)


def _spread(plan: LayerPlan, layout: DecoderLayout) -> LayerPlan:
    """Indexer-space roles onto decoder layers; layers without an indexer stay shared."""
    if layout.indexer_layers[0] != 0:
        raise PlanError(f"decoder layer 0 has no indexer ({layout.describe()}): every engine needs "
                        "layer 0 to compute its own top-k, so no plan can be deployed on this model")
    roles = [SHARED] * layout.num_layers
    for layer, role in zip(layout.indexer_layers, plan.pattern):
        roles[layer] = role
    return LayerPlan("".join(roles))


def _check_weights(plan: LayerPlan, layout: DecoderLayout) -> None:
    have = set(layout.indexer_layers)
    missing = [i for i, role in enumerate(plan.pattern) if role == FULL and i not in have]
    if missing:
        suggestion = "".join(plan.pattern[i] for i in layout.indexer_layers)
        raise PlanError(
            f"plan {plan.pattern!r} makes decoder layers {_ranges(missing)} F, but they have no indexer "
            f"weights (this model has indexers on decoder layers {_ranges(layout.indexer_layers)} only); "
            f"a plan can only turn those into S. Give one role per indexer "
            f"({len(layout.indexer_layers)}), e.g. {suggestion!r}")


def _length_error(plan: LayerPlan, layout: DecoderLayout) -> PlanError:
    both = (f"{len(layout.indexer_layers)} (one per indexer) or {layout.num_layers} (one per decoder layer)"
            if len(layout.indexer_layers) != layout.num_layers else str(layout.num_layers))
    return PlanError(f"plan {plan.pattern!r} has {len(plan)} roles but this model has {layout.describe()}; "
                     f"give {both} roles")


def engine_overrides(decoder_plan: LayerPlan) -> dict:
    """Config keys that make every engine pick `decoder_plan` (one role per decoder layer).

    Both keys, consistent, because engines disagree on which one they read: vLLM and SGLang take
    `indexer_types` first, and transformers fills it for GLM-5.x whenever a config is built, so a
    pattern alone is silently ignored there; TRT-LLM reads only `index_topk_pattern`; some SGLang
    builds read the pattern first. Full length, because vLLM rejects an `indexer_types` of another
    length and a short pattern is padded with F."""
    return {"indexer_types": [ROLE_WORDS[r] for r in decoder_plan.pattern],
            "index_topk_pattern": decoder_plan.pattern}


# ------------------------------------------------------------------ commands
@dataclass(frozen=True)
class Deployment:
    """A plan ready to deploy: its roles per decoder layer and what each engine is given."""

    plan: LayerPlan           # as given (one role per indexer, or per decoder layer)
    decoder_plan: LayerPlan   # one role per decoder layer: what engines read
    layout: DecoderLayout | None

    @property
    def overrides(self) -> dict:
        return engine_overrides(self.decoder_plan)

    @property
    def model_type(self) -> str | None:
        return self.layout.model_type if self.layout else None

    def commands(self, model: str = "MODEL") -> dict[str, str]:
        """Engine -> the exact line to run (`model`: the served checkpoint path or name)."""
        if self.layout is not None and self.model_type is None:
            # not an HF checkpoint (e.g. the reference model): no engine serves it
            return {"torch.compile": self._backend_line()}
        flags = json.dumps(self.overrides, separators=(", ", ": "))
        return {
            "vLLM": f"vllm serve {model} --hf-overrides '{flags}'",
            "SGLang": f"python -m sglang.launch_server --model-path {model} --json-model-override-args '{flags}'",
            **self._hf_commands(model),
            "TRT-LLM": f"python -c '{_MERGE_SCRIPT}' {model}/config.json '{flags}'",
        }

    def _backend_line(self) -> str:
        return f'model = torch.compile(model, backend="indexcache", options={{"plan": "{self.plan.pattern}"}})'

    def _hf_commands(self, model: str) -> dict[str, str]:
        glm = self.layout is None or self.model_type in SKIPS_SHARED_INDEXERS
        native = self._hf_glm_commands(model) if glm else {}
        if self.layout is not None and glm:
            return native
        # HF's DeepseekV32 runs every indexer whatever the config says (transformers 5.25 has no
        # plan for it): our backend applies the plan, in our index space
        label = "HF DeepSeek-V3.2" if self.layout is None else "HF transformers"
        return {**native, label: self._backend_line()}

    def _hf_glm_commands(self, model: str) -> dict[str, str]:
        # indexer_types, not index_topk_pattern: from_pretrained only sets keys that already exist
        # as attributes, after __post_init__ has filled indexer_types (PretrainedConfig.from_dict)
        types = f'[{{"F": "full", "S": "shared"}}[r] for r in "{self.decoder_plan.pattern}"]'
        return {
            "HF from_pretrained": f'config = GlmMoeDsaConfig.from_pretrained("{model}", indexer_types={types})',
            "HF constructor": (f"config = GlmMoeDsaConfig(num_hidden_layers={len(self.decoder_plan)}, "
                               f"indexer_types={types})"),
        }


# TRT-LLM reads the plan from the checkpoint's config.json: merge the overrides into it (both keys,
# so vLLM/SGLang/HF loading the same directory agree with it)
_MERGE_SCRIPT = ('import json,sys; p=sys.argv[1]; c=json.load(open(p)); c.update(json.loads(sys.argv[2])); '
                 'json.dump(c, open(p, "w"), indent=2)')  # no single quote: the shell line wraps it in them


def deployment(plan, model_or_config=None) -> Deployment:
    """Map `plan` onto the decoder layers of `model_or_config` (an nn.Module, a transformers config,
    a config dict or a config.json/checkpoint path; None: the plan already has one role per decoder
    layer) and check it only needs indexer weights the model has."""
    layout = None if model_or_config is None else layout_of(model_or_config)
    given = LayerPlan.coerce(plan, len(layout.indexer_layers) if layout else None)
    return Deployment(given, to_decoder_plan(given, layout), layout)


def _ranges(layers) -> str:
    """[0, 1, 2, 6] -> '0-2, 6'."""
    out, layers = [], list(layers)
    start = prev = layers[0] if layers else None
    for i in layers[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = i
    return ", ".join(out)
