"""Layer plans: which DSA layers keep their indexer (F, "full") and which reuse one (S, "shared").

A plan is a string over {F, S}, one character per indexer layer in model order, e.g. "FSSSFSSS",
written like HF's `index_topk_pattern`. An S layer reuses the top-k indices of the nearest preceding
F layer, so the first layer must be F. Engines read one role per *decoder* layer; where some decoder
layers have no indexer (GLM-5.2-style checkpoints) `to_hf_overrides(model)` maps the plan onto them
(ic_compile/deploy.py, docs/deploy.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import IndexCacheError

FULL, SHARED = "F", "S"


class PlanError(IndexCacheError, ValueError):
    """A plan that cannot be applied; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class LayerPlan:
    pattern: str  # one of "F"/"S" per indexer layer, e.g. "FSSF"

    def __post_init__(self):
        check_pattern(self.pattern)

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_pattern(cls, pattern: str) -> "LayerPlan":
        return cls(normalize_pattern(pattern))

    @classmethod
    def all_full(cls, num_layers: int) -> "LayerPlan":
        return cls(FULL * num_layers)

    @classmethod
    def from_freq(cls, num_layers: int, freq: int, offset: int = 2) -> "LayerPlan":
        """HF `index_topk_freq` / `index_skip_topk_offset` semantics (GlmMoeDsaConfig):
        layer i is F iff max(i - offset + 1, 0) % freq == 0, so layers 0..offset-1 are F and
        then every `freq`-th layer."""
        if num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {num_layers}")
        if freq < 1:
            raise PlanError(f"freq must be >= 1 (1 = every layer keeps its indexer), got {freq}")
        if offset < 0:
            raise PlanError(f"offset must be >= 0, got {offset}")
        roles = [FULL if max(i - offset + 1, 0) % freq == 0 else SHARED for i in range(num_layers)]
        return cls("".join(roles))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LayerPlan":
        """Reads {"index_topk_pattern": "FSSF..."} (also accepts "pattern" or "plan")."""
        data = _read_json(path)
        if isinstance(data, str):
            return cls.from_pattern(data)
        for key in ("index_topk_pattern", "pattern", "plan"):
            if key in data:
                return cls.from_pattern(data[key])
        raise PlanError(f"{path}: no 'index_topk_pattern' key; expected JSON like "
                        '{"index_topk_pattern": "FSSF"}')

    @classmethod
    def coerce(cls, plan, num_layers: int | None = None) -> "LayerPlan | None":
        """str pattern | path to .json | LayerPlan | {"freq": n, "offset": m} | None -> LayerPlan."""
        if plan is None or isinstance(plan, LayerPlan):
            return plan
        if isinstance(plan, dict):
            if "freq" not in plan:
                raise PlanError(f"plan dict needs a 'freq' key, got {sorted(plan)}")
            if num_layers is None:
                raise PlanError("a freq plan needs the number of indexer layers")
            return cls.from_freq(num_layers, int(plan["freq"]), int(plan.get("offset", 2)))
        if isinstance(plan, os.PathLike) or (isinstance(plan, str) and plan.endswith(".json")):
            return cls.from_json(plan)
        if isinstance(plan, str):
            return cls.from_pattern(plan)
        raise PlanError(f"plan must be a pattern string, a LayerPlan, a .json path or "
                        f"{{'freq': n}}; got {type(plan).__name__}")

    # --- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pattern)

    def __str__(self) -> str:
        return self.pattern

    @property
    def num_full(self) -> int:
        return self.pattern.count(FULL)

    def sources(self) -> list[int]:
        """For each layer, the index of the F layer whose top-k it uses (itself when F)."""
        sources, last_full = [], 0
        for i, role in enumerate(self.pattern):
            last_full = i if role == FULL else last_full
            sources.append(last_full)
        return sources

    def to_hf_overrides(self, model_or_config=None) -> dict:
        """Config overrides that make vLLM (`--hf-overrides`), SGLang (`--json-model-override-args`),
        HF transformers (`GlmMoeDsaConfig(**overrides)`) and TRT-LLM (merged into config.json) run
        this plan: `indexer_types` and `index_topk_pattern`, one role per decoder layer.

        Without `model_or_config` the plan must have one role per decoder layer. With one (an
        nn.Module, a transformers config, a config dict or a config.json/checkpoint path) the plan
        has one role per indexer of that model and is mapped onto its decoder layers; a plan that
        needs indexer weights the model lacks raises PlanError."""
        from .deploy import deployment  # deploy imports this module
        return deployment(self, model_or_config).overrides

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps({"index_topk_pattern": self.pattern, "num_layers": len(self),
                           "num_full": self.num_full}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


def _read_json(path):
    """The JSON in `path`; a missing file or invalid JSON is a one-line PlanError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {str(path)!r} not found; give a path to a plan.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
            else "not UTF-8 text"
        raise PlanError(f"plan file {str(path)!r} is not valid JSON ({where}); expected JSON like "
                        '{"index_topk_pattern": "FSSF"}') from None


def normalize_pattern(pattern: str) -> str:
    """Accepts "FSSF", "fssf", "F S S F", "F,S,S,F" or HF indexer_types words ("full"/"shared")."""
    if not isinstance(pattern, str):
        if isinstance(pattern, (list, tuple)):
            return "".join(_role_from_word(w) for w in pattern)
        raise PlanError(f"pattern must be a string like 'FSSF', got {type(pattern).__name__}")
    return "".join(ch for ch in pattern.upper() if ch not in " ,_-\t\n")


def _role_from_word(word: str) -> str:
    table = {"full": FULL, "f": FULL, "shared": SHARED, "s": SHARED}
    if str(word).lower() not in table:
        raise PlanError(f"unknown layer role {word!r}: use 'F'/'full' or 'S'/'shared'")
    return table[str(word).lower()]


def check_pattern(pattern: str) -> None:
    if not pattern:
        raise PlanError("empty plan: give one 'F' or 'S' per indexer layer, e.g. 'FSSS'")
    bad = sorted({ch for ch in pattern if ch not in (FULL, SHARED)})
    if bad:
        raise PlanError(f"plan {pattern!r} has unknown characters {bad}: only 'F' (full) and "
                        "'S' (shared) are allowed")
    if pattern[0] != FULL:
        raise PlanError(f"plan {pattern!r}: the first indexer layer must be 'F' — an 'S' layer "
                        "reuses the top-k of an earlier F layer and the first has none")


def check_plan_length(plan: LayerPlan, num_detected: int) -> None:
    if len(plan) != num_detected:
        raise PlanError(
            f"plan {plan.pattern!r} has {len(plan)} layers but {num_detected} indexer layers were "
            f"detected in the graph; give exactly one 'F'/'S' per indexer layer. If the model has "
            "graph breaks, compile it with fullgraph=True so that one graph holds all layers.")
