"""Greedy, training-free plan search (IndexCache paper, DESIGN.md §6).

    result = search_plan(model, calibration_ids, num_full=2)      # or ratio=0.25 / loss_budget=0.05
    result.plan            # LayerPlan("FSSFSSSS")
    result.to_json("search.json"); result.plot("loss.png")

Start with every indexer layer F. Each step tries every F layer but the first as S, measures the
objective on the calibration set and keeps the best candidate; it stops at `num_full` F layers, at a
`ratio` of F layers, or before the best candidate's loss exceeds the all-F loss by `loss_budget`.

What is measured is what the backend runs. Two evaluators, both exact:

  "graph"   The model is captured once by Dynamo (one compile per batch shape); every candidate plan
            is applied to that graph with `ic_compile.rewrite.rewrite(gm, plan)` and the rewritten
            graph is run as is — the code path of `options={"lowering": "eager"}`. Any model.
  "prefix"  Reference model (ic_compile/dsa_model.py) only. Changing layer i from F to S cannot change
            layers 0..i-1, so the hidden state and top-k entering each layer under the current plan
            are cached per batch, and a candidate is run from layer i onwards only (S layers skip
            their indexer). On average this halves the work per candidate. Same ops as the graph;
            tests check its losses against the indexcache backend.
  "auto"    "prefix" for the reference model (when its cache fits `cache_limit_bytes`), else "graph".

Objectives: "lm_loss" — mean next-token cross entropy over all calibration tokens; "kl" — mean over
tokens of KL(all-F next-token distribution || candidate's), label-free. The all-F log-probabilities
are computed once and cached (N·L·vocab floats on the model's device; recomputed per evaluation when
that exceeds `cache_limit_bytes`). The model is put in eval mode for the search.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .models import vocab_size
from ..plan import FULL, SHARED, LayerPlan, PlanError

OBJECTIVES = ("lm_loss", "kl")
EVALUATORS = ("auto", "graph", "prefix")


# ============================================================== calibration data

def byte_tokens(text: str | bytes, vocab_size: int = 256) -> torch.Tensor:
    """Byte-level fallback tokenizer: UTF-8 bytes modulo the vocabulary size."""
    data = text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.zeros(0, dtype=torch.long)
    return ids % vocab_size


def text_files(paths) -> list[Path]:
    """Files given directly, or every file (recursively, sorted) under given directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"calibration path {p} does not exist")
    return files


def calibration_from_files(paths, seq_len: int = 256, *, tokenizer=None, vocab_size: int = 256,
                           max_sequences: int | None = None) -> torch.LongTensor:
    """Concatenate the files' tokens and cut them into rows of `seq_len` -> LongTensor [N, seq_len].

    `tokenizer`: an HF tokenizer (anything with `.encode(text)`) or a callable text -> ids; without one,
    bytes % vocab_size."""
    chunks = []
    for f in text_files(paths):
        if tokenizer is None:
            ids = byte_tokens(f.read_bytes(), vocab_size)
        else:
            encode = getattr(tokenizer, "encode", tokenizer)
            ids = torch.as_tensor(list(encode(f.read_text(encoding="utf-8", errors="replace"))),
                                  dtype=torch.long)
        chunks.append(ids)
        if max_sequences is not None and sum(c.numel() for c in chunks) >= max_sequences * seq_len:
            break
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"empty calibration set: the files hold {ids.numel()} tokens, fewer than one "
                         f"sequence of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def as_batches(calibration, batch_size: int = 8, *, seq_len: int = 256, tokenizer=None,
               vocab_size: int | None = None) -> list[torch.Tensor]:
    """LongTensor [N, L] (split into batches) | iterable of [B, L] / [L] tensors | file/dir path(s)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(calibration, (str, os.PathLike)) or (
            isinstance(calibration, (list, tuple)) and calibration
            and all(isinstance(c, (str, os.PathLike)) for c in calibration)):
        calibration = calibration_from_files(calibration, seq_len, tokenizer=tokenizer,
                                             vocab_size=vocab_size or 256)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 1:
            calibration = calibration[None]
        if calibration.dim() != 2:
            raise ValueError(f"calibration tensor must be token ids [N, L], got shape {tuple(calibration.shape)}")
        batches = list(calibration.split(batch_size))
    else:
        try:
            batches = [b if b.dim() == 2 else b[None] for b in (torch.as_tensor(b) for b in calibration)]
        except TypeError as exc:
            raise ValueError("calibration must be a LongTensor [N, L], an iterable of such batches, or "
                             f"text file path(s); got {type(calibration).__name__}") from exc
    batches = [b for b in batches if b.numel() > 0]
    if not batches:
        raise ValueError("empty calibration set: give at least one sequence of token ids")
    for b in batches:
        if b.dtype not in (torch.int64, torch.int32) or b.dim() != 2:
            raise ValueError(f"calibration batches must be integer token ids [B, L], got {b.dtype} "
                             f"{tuple(b.shape)}")
        if b.shape[1] < 2:
            raise ValueError(f"calibration sequences need >= 2 tokens for next-token loss, got L={b.shape[1]}")
    return [b.long() for b in batches]


# ============================================================== model adapters

def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and not hasattr(model, "tok_embeddings")


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V] for the reference model (forward(idx)) and HF causal LMs alike."""
    if is_hf_model(model):
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def is_reference_model(model: nn.Module) -> bool:
    return (hasattr(model, "tok_embeddings") and hasattr(model, "layers") and hasattr(model, "rope_cos")
            and all(hasattr(layer, "attn") for layer in model.layers))


def num_indexer_layers(model: nn.Module) -> int:
    from ..reference import find_indexer_modules
    return len(find_indexer_modules(model))


# ============================================================== evaluators

class GraphEvaluator:
    """Runs the model's Dynamo graph(s), rewritten by `rewrite(gm, plan)`, for any plan.

    One `torch.compile` with a recording backend; its compiled function dispatches to the rewritten
    graph of the plan currently selected, so changing plans never recompiles."""

    name = "graph"

    def __init__(self, model: nn.Module):
        self.model = model
        self.pattern: str | None = None
        self._graphs: list = []
        self._rewritten: dict[tuple[int, str], object] = {}
        self._compiled = torch.compile(model, backend=self._backend, dynamic=False)

    def _backend(self, gm, _example_inputs, **_):
        slot = len(self._graphs)
        self._graphs.append(gm)

        def run(*args):
            return self._forward_for(slot)(*args)
        return run

    def _forward_for(self, slot: int):
        from ..rewrite import rewrite
        gm = self._graphs[slot]
        key = (slot, self.pattern)
        if key not in self._rewritten:
            self._rewritten[key] = rewrite(gm, self.pattern, strict=True).gm.forward
        return self._rewritten[key]

    def num_layers(self, example: torch.Tensor) -> int:
        from ..rewrite import rewrite
        if not self._graphs:
            self.logits(example, None)
        counts = [len(rewrite(gm, None, strict=True).detection.matches) for gm in self._graphs]
        found = [c for c in counts if c]
        if not found:
            raise PlanError("search: no lightning indexer found in the model's graph; nothing to search")
        if len(found) > 1:
            raise PlanError(f"the model compiles to {len(self._graphs)} graphs with indexers in {len(found)} "
                            "of them (graph breaks); a plan must see all indexer layers in one graph")
        return found[0]

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pattern: str | None, batch_index: int | None = None) -> torch.Tensor:
        self.pattern = pattern
        return forward_logits(self._compiled, ids)

    def accept(self, pattern: str) -> None:  # no per-plan state to refresh
        pass


class PrefixEvaluator:
    """Reference model only: caches each layer's input under the current plan, runs candidates from
    the first changed layer. S layers skip their indexer (as the rewritten graph does)."""

    name = "prefix"

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]):
        if not is_reference_model(model):
            raise ValueError("evaluator='prefix' needs the reference model of ic_compile/dsa_model.py; "
                             "use evaluator='graph' for other models")
        missing = [i for i, layer in enumerate(model.layers) if layer.attn.indexer is None]
        if missing:
            raise PlanError(f"search needs a model whose every layer has its indexer (all F); layers "
                            f"{missing} have none. Build it with index_topk_pattern=None.")
        self.model, self.batches = model, batches
        self.current: str | None = None
        self.cache: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in batches]

    def num_layers(self, example) -> int:
        return len(self.model.layers)

    @contextlib.contextmanager
    def _shared(self, layer):
        attn = layer.attn
        indexer = attn.indexer
        attn._modules["indexer"] = None
        try:
            yield
        finally:
            attn._modules["indexer"] = indexer

    def _run(self, batch_index: int, pattern: str, start: int, record: bool) -> torch.Tensor:
        model = self.model
        ids = self.batches[batch_index]
        positions = torch.arange(ids.shape[1], device=ids.device)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        if start == 0:
            x, topk = model.tok_embeddings(ids), None
        else:
            x, topk = self.cache[batch_index][start]
        entries = self.cache[batch_index]
        for i in range(start, len(model.layers)):
            layer = model.layers[i]
            if record:
                if len(entries) <= i:
                    entries.append((x, topk))
                else:
                    entries[i] = (x, topk)
            ctx = self._shared(layer) if pattern[i] == SHARED else contextlib.nullcontext()
            with ctx:
                x, topk = layer(x, cos, sin, positions, topk, False)
        return model.output(model.norm(x))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, pattern: str, batch_index: int) -> torch.Tensor:
        if self.current is None:  # first call: all-F pass that fills the cache
            self.current = pattern
            return self._run(batch_index, pattern, 0, record=True)
        if batch_index is None:
            raise ValueError("prefix evaluator needs the batch index")
        diff = [i for i, (a, b) in enumerate(zip(self.current, pattern)) if a != b]
        if not self.cache[batch_index]:
            return self._run(batch_index, pattern, 0, record=(pattern == self.current))
        start = diff[0] if diff else 0
        return self._run(batch_index, pattern, start, record=False)

    @torch.no_grad()
    def accept(self, pattern: str) -> None:
        """Make `pattern` the current plan: refresh the cached layer inputs from its first change."""
        if self.current is None:
            self.current = pattern
            return
        diff = [i for i, (a, b) in enumerate(zip(self.current, pattern)) if a != b]
        self.current = pattern
        if not diff:
            return
        for b in range(len(self.batches)):
            if self.cache[b]:
                self._run(b, pattern, diff[0], record=True)


CACHE_LIMIT_BYTES = 8 << 30  # prefix-cache and KL-reference budgets (each)


def prefix_cache_bytes(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """What PrefixEvaluator would hold: every layer's input for every calibration token."""
    tokens = sum(b.numel() for b in batches)
    dim = model.args.dim
    elem = next(model.parameters()).element_size()
    return tokens * dim * elem * len(model.layers)


def make_evaluator(model: nn.Module, batches: list[torch.Tensor], evaluator: str = "auto",
                   cache_limit_bytes: int = CACHE_LIMIT_BYTES):
    """"auto": the prefix evaluator for the reference model when its cache fits cache_limit_bytes."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator={evaluator!r} is not one of {EVALUATORS}")
    if evaluator == "auto":
        evaluator = ("prefix" if is_reference_model(model)
                     and prefix_cache_bytes(model, batches) <= cache_limit_bytes else "graph")
    return PrefixEvaluator(model, batches) if evaluator == "prefix" else GraphEvaluator(model)


class Objective:
    """Token-weighted mean over the calibration set of next-token CE or KL(all-F || candidate).

    KL: the all-F log-probabilities are cached when tokens · vocab · 4 bytes fit cache_limit_bytes,
    else recomputed for every evaluation (twice the work, no memory)."""

    def __init__(self, kind: str, cache_limit_bytes: int = CACHE_LIMIT_BYTES):
        if kind not in OBJECTIVES:
            raise ValueError(f"objective={kind!r} is not one of {OBJECTIVES}")
        self.kind = kind
        self.cache_limit_bytes = cache_limit_bytes
        self.reference: list[torch.Tensor] = []  # all-F log-probs per batch (kl only)
        self.cached_bytes = 0
        self.recompute = None  # batch_index -> all-F logits, once the cache is over its limit

    def batch_sum(self, logits: torch.Tensor, ids: torch.Tensor, batch_index: int) -> tuple[float, int]:
        if self.kind == "lm_loss":
            logits = logits[:, :-1].float()
            target = ids[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            return loss.item(), target.numel()
        logp = logits.float().log_softmax(-1)
        if self.recompute is None and len(self.reference) <= batch_index:  # first (all-F) pass
            self.cached_bytes += logp.numel() * logp.element_size()
            if self.cached_bytes <= self.cache_limit_bytes:
                self.reference.append(logp)
            else:
                self.reference.clear()
                self.recompute = True
        if self.recompute is True:  # still in the all-F pass: KL(all-F || all-F) = 0
            return 0.0, logp.shape[0] * logp.shape[1]
        if self.recompute is not None:
            ref = self.recompute(batch_index).float().log_softmax(-1)
        else:
            ref = self.reference[batch_index]
        kl = (ref.exp() * (ref - logp)).sum(-1)  # [B, L]
        return kl.sum().item(), kl.numel()


def evaluate_plan(model: nn.Module, calibration, plan, *, objective: str = "lm_loss",
                  batch_size: int = 8, evaluator: str = "auto",
                  cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> float:
    """The objective of one plan (for "kl" relative to the all-F model) on the calibration set."""
    batches = _to_device(as_batches(calibration, batch_size, vocab_size=vocab_size(model)), model)
    with _eval_mode(model):
        ev = make_evaluator(model, batches, evaluator, cache_limit_bytes)
        n = ev.num_layers(batches[0])
        plan = LayerPlan.coerce(plan, n)
        obj = Objective(objective, cache_limit_bytes)
        if objective == "kl":
            _loss(ev, obj, batches, FULL * n)
        return _loss(ev, obj, batches, plan.pattern)


def _loss(ev, obj: Objective, batches, pattern: str) -> float:
    if obj.recompute is True:  # KL reference over its cache limit: recompute all-F logits per batch
        n = len(pattern)
        obj.recompute = lambda b: ev.logits(batches[b], "F" * n, b)
    total, count = 0.0, 0
    for b, ids in enumerate(batches):
        s, c = obj.batch_sum(ev.logits(ids, pattern, b), ids, b)
        total, count = total + s, count + c
    return total / count


def _to_device(batches, model):
    device = model_device(model)
    return [b.to(device) for b in batches]


# ============================================================== search

@dataclass
class SearchStep:
    step: int
    num_full: int  # F layers after this step
    pattern: str  # plan after this step
    loss: float  # its objective
    turned_shared: int | None  # layer made S in this step (None for the starting plan)
    candidates: dict[int, float] = field(default_factory=dict)  # layer -> loss if made S

    def to_dict(self) -> dict:
        return {"step": self.step, "num_full": self.num_full, "pattern": self.pattern, "loss": self.loss,
                "turned_shared": self.turned_shared,
                "candidates": {str(k): v for k, v in self.candidates.items()}}


@dataclass
class SearchResult:
    plan: LayerPlan
    history: list[SearchStep]
    evaluations: int  # candidate plans evaluated (each over the whole calibration set)
    seconds: float
    objective: str
    full_loss: float  # all-F objective (0 for "kl")
    stop_reason: str
    evaluator: str
    tokens: int  # calibration tokens per evaluation
    rejected: dict | None = None  # candidate losses of the step the loss budget refused

    @property
    def loss(self) -> float:
        return self.history[-1].loss

    def plan_with(self, num_full: int) -> LayerPlan:
        """The greedy path's plan with `num_full` F layers (greedy plans are nested)."""
        for step in self.history:
            if step.num_full == num_full:
                return LayerPlan(step.pattern)
        raise PlanError(f"the search never reached {num_full} F layers "
                        f"(it visited {[s.num_full for s in self.history]})")

    def to_dict(self) -> dict:
        return {"index_topk_pattern": self.plan.pattern, "num_layers": len(self.plan),
                "num_full": self.plan.num_full, "objective": self.objective, "loss": self.loss,
                "full_loss": self.full_loss, "stop_reason": self.stop_reason, "evaluations": self.evaluations,
                "seconds": self.seconds, "evaluator": self.evaluator, "calibration_tokens": self.tokens,
                "history": [s.to_dict() for s in self.history],
                "rejected": None if self.rejected is None else {str(k): v for k, v in self.rejected.items()}}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: objective vs number of F layers along the greedy path, candidates as dots."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        fig, ax = plt.subplots(figsize=(6, 4))
        label = "candidates (one more layer made S)"
        for step in self.history[1:]:
            xs = [step.num_full] * len(step.candidates)
            ax.scatter(xs, list(step.candidates.values()), s=10, color="0.6", zorder=1, label=label)
            label = None  # one legend entry for every step's candidates
        ax.plot([s.num_full for s in self.history], [s.loss for s in self.history], "o-", zorder=2,
                label=f"greedy path (chosen plan per step, {self.objective})")
        ax.axhline(self.full_loss, color="k", lw=0.8, ls="--", label="all F")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # F-layer counts are whole numbers
        ax.set_xlabel("number of F (full) indexer layers")
        ax.set_ylabel("KL(all-F || plan)" if self.objective == "kl" else "calibration LM loss")
        ax.invert_xaxis()
        ax.set_title(f"greedy plan search: {self.plan.pattern}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def target_num_full(num_layers: int, num_full: int | None, ratio: float | None) -> int | None:
    if num_full is not None and ratio is not None:
        raise ValueError("give either num_full or ratio, not both")
    if num_full is not None:
        if isinstance(num_full, bool) or not isinstance(num_full, int):
            raise ValueError(f"num_full must be an int, got {num_full!r}")
        if not 1 <= num_full <= num_layers:
            raise ValueError(f"num_full must be between 1 and the number of indexer layers "
                             f"({num_layers}), got {num_full}")
        return num_full
    if ratio is not None:
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1] (the fraction of F layers kept), got {ratio!r}")
        return max(1, min(num_layers, round(ratio * num_layers)))
    return None


def search_plan(model: nn.Module, calibration, *, num_full: int | None = None, ratio: float | None = None,
                loss_budget: float | None = None, objective: str = "lm_loss", progress: bool = True,
                batch_size: int = 8, init=None, evaluator: str = "auto", seq_len: int = 256,
                tokenizer=None, cache_limit_bytes: int = CACHE_LIMIT_BYTES) -> SearchResult:
    """Greedy training-free search for an IndexCache plan.

    calibration: LongTensor [N, L] | iterable of [B, L] batches | text file/dir path(s) (tokenized with
    `tokenizer`, or bytes % vocab, cut into rows of `seq_len`). Stops at `num_full` F layers, at
    round(`ratio` · layers) F layers, or before the best loss exceeds all-F loss + `loss_budget`;
    without any of these it goes down to one F layer. `init`: start from this plan instead of all F
    (e.g. `overlap_plan(...)` or a previous result; its F layers are the ones tried).
    cache_limit_bytes bounds the prefix cache ("auto" falls back to "graph" above it) and the cached
    all-F log-probabilities of objective="kl" (recomputed per evaluation above it)."""
    with _eval_mode(model):
        return _search(model, calibration, num_full, ratio, loss_budget, objective, progress, batch_size,
                       init, evaluator, seq_len, tokenizer, cache_limit_bytes)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Search measures the deployed (eval-mode, no dropout) model; the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _search(model, calibration, num_full, ratio, loss_budget, objective, progress, batch_size, init,
            evaluator, seq_len, tokenizer, cache_limit_bytes) -> SearchResult:
    start_time = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    if loss_budget is not None and not (isinstance(loss_budget, (int, float)) and loss_budget >= 0):
        raise ValueError(f"loss_budget must be a number >= 0, got {loss_budget!r}")
    if num_full is not None and ratio is not None:
        raise ValueError("give either num_full or ratio, not both")
    batches = _to_device(as_batches(calibration, batch_size, seq_len=seq_len, tokenizer=tokenizer,
                                    vocab_size=vocab_size(model)), model)
    ev = make_evaluator(model, batches, evaluator, cache_limit_bytes)
    n = ev.num_layers(batches[0])
    target = target_num_full(n, num_full, ratio)
    stop_at = target if target is not None else 1
    all_full = FULL * n
    current = LayerPlan.coerce(init, n) if init is not None else LayerPlan.all_full(n)
    if len(current) != n:
        raise PlanError(f"init plan {current.pattern!r} has {len(current)} layers, the model has {n}")
    if current.num_full < stop_at:
        raise PlanError(f"init plan {current.pattern!r} has {current.num_full} F layers, fewer than the "
                        f"target {stop_at}")

    obj = Objective(objective, cache_limit_bytes)
    bar = _progress_bar(progress, _planned_evaluations(current, stop_at, target, loss_budget),
                        f"search {objective}")
    evaluations = 0
    full_loss = _loss(ev, obj, batches, all_full)  # also fills the prefix cache / KL reference
    evaluations += 1
    _advance(bar, F=n, plan=all_full, loss=full_loss)
    if current.pattern != all_full:
        ev.accept(current.pattern)
        current_loss = _loss(ev, obj, batches, current.pattern)
        evaluations += 1
        _advance(bar, F=current.num_full, plan=current.pattern, loss=current_loss)
    else:
        current_loss = full_loss
    history = [SearchStep(0, current.num_full, current.pattern, current_loss, None)]
    stop_reason = "reached target" if current.num_full == stop_at else ""
    rejected = None
    while current.num_full > stop_at:
        candidates = {}
        for layer in range(1, n):
            if current.pattern[layer] != FULL:
                continue
            pattern = current.pattern[:layer] + SHARED + current.pattern[layer + 1:]
            candidates[layer] = _loss(ev, obj, batches, pattern)
            evaluations += 1
            leader = min(candidates, key=lambda l: (candidates[l], l))  # the step's best so far
            _advance(bar, F=current.num_full - 1, best=current.pattern[:leader] + SHARED
                     + current.pattern[leader + 1:], loss=candidates[leader])
        best = min(candidates, key=lambda l: (candidates[l], l))
        if loss_budget is not None and candidates[best] > full_loss + loss_budget:
            rejected = candidates
            stop_reason = (f"loss budget: best next loss {candidates[best]:.6g} > all-F {full_loss:.6g} "
                           f"+ {loss_budget}")
            break
        current = LayerPlan(current.pattern[:best] + SHARED + current.pattern[best + 1:])
        current_loss = candidates[best]
        ev.accept(current.pattern)
        history.append(SearchStep(len(history), current.num_full, current.pattern, current_loss, best,
                                  candidates))
        stop_reason = "reached target" if target is not None else "reached one F layer"
        _advance(bar, 0, F=current.num_full, plan=current.pattern, loss=current_loss)
    if bar is not None:
        bar.total = bar.n  # a loss budget may stop before the planned count
        bar.close()
    result = SearchResult(current, history, evaluations, time.perf_counter() - start_time, objective,
                          full_loss, stop_reason or "reached target", ev.name,
                          sum(b.numel() for b in batches), rejected)
    return result


def _planned_evaluations(current: LayerPlan, stop_at: int, target, loss_budget) -> int | None:
    """What the bar counts: the all-F plan, the init plan (if not all F), and every candidate down to
    the target (F layers but the first, each step); None when a loss budget decides where to stop."""
    if target is None and loss_budget is not None:
        return None
    start = 1 + (current.num_full < len(current))
    return start + sum(f - 1 for f in range(current.num_full, stop_at, -1))


def _advance(bar, count: int = 1, **postfix) -> None:
    """Count `count` evaluations; the postfix shows the plan that matters (the step's best candidate
    while a step runs, the chosen plan after it), never just the last candidate's loss."""
    if bar is None:
        return
    if "loss" in postfix:
        postfix["loss"] = f"{postfix['loss']:.4f}"
    bar.set_postfix(postfix, refresh=count == 0)  # update(0) would not redraw
    bar.update(count)


def _progress_bar(progress: bool, total, desc: str):
    if not progress:
        return None
    import sys
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="plan", leave=False, file=sys.stderr)


# ============================================================== CLI

def register_cli(subparsers) -> None:
    from ..cli import add_model_arguments, examples, positive_int
    parser = subparsers.add_parser(
        "search", help="greedy plan search on calibration data",
        description="Greedy training-free search (IndexCache paper): starting from all F, turn the F layer "
                    "whose sharing costs least into S, until the target. Writes plan.json, search.json "
                    "and loss.png into --out.",
        epilog=examples("ic search --model dsa:tiny --data README.md docs/ --num-full 2 --out search_out",
                        "ic search --model ckpt:runs/small --data corpus/ --ratio 0.25 --objective kl --out s",
                        "ic search --model hf:config.json --tokenizer DIR --data texts/ --loss-budget 0.05 --out s"))
    add_model_arguments(parser, seq=256, batch=8, seq_help="calibration sequence length (tokens per row)")
    parser.add_argument("--data", nargs="+", required=True, help="calibration text files or directories")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--num-full", type=positive_int, help="stop at this many F layers")
    target.add_argument("--ratio", type=float, help="stop at this fraction of F layers, in (0, 1]")
    parser.add_argument("--loss-budget", type=float,
                        help="stop before loss > all-F loss + budget (without a target: down to 1 F layer)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="lm_loss",
                        help="lm_loss: next-token cross entropy; kl: KL(all-F || plan), label-free")
    parser.add_argument("--max-sequences", type=positive_int, default=64, help="calibration sequences used")
    parser.add_argument("--tokenizer", help="HF tokenizer name/dir (default: bytes %% vocab)")
    parser.add_argument("--evaluator", choices=EVALUATORS, default="auto",
                        help="graph: rewritten Dynamo graph, any model; prefix: reference model, reruns "
                             "from the changed layer; auto: prefix where it applies")
    parser.add_argument("--device", default="cpu", help="torch device for the model and data")
    parser.add_argument("--out", required=True, help="output directory (created; checked before the search)")
    parser.set_defaults(run=_run_cli)


def check_data_paths(paths) -> None:
    """--data: every path exists and some file holds text, checked before the model is built."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"--data {' '.join(map(str, missing))}: does not exist; give text files or directories")
    if not text_files(paths):
        raise ValueError(f"--data {' '.join(map(str, paths))}: no files in there; give text files or directories")


def _run_cli(args) -> int:
    from ..cli import Stages, progress_enabled
    from ..outputs import output_dir
    from .models import load_model
    out = output_dir(args.out)  # before the search: a bad path must not cost its minutes
    check_data_paths(args.data)
    with Stages(["load model", "tokenize"], "search setup") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed).to(args.device)
        with stages.step("tokenize"):
            tokenizer = None
            if args.tokenizer:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            data = calibration_from_files(args.data, args.seq, tokenizer=tokenizer, vocab_size=vocab_size(model),
                                          max_sequences=args.max_sequences)
    result = search_plan(model, data, num_full=args.num_full, ratio=args.ratio, loss_budget=args.loss_budget,
                         objective=args.objective, batch_size=args.batch, evaluator=args.evaluator,
                         progress=progress_enabled())
    result.plan.to_json(out / "plan.json")
    result.to_json(out / "search.json")
    result.plot(out / "loss.png")
    print(f"plan {result.plan.pattern} ({result.plan.num_full}/{len(result.plan)} F), {args.objective} "
          f"{result.loss:.4f} (all F {result.full_loss:.4f}); {result.evaluations} evaluations "
          f"(all F + candidates) in {result.seconds:.1f}s; wrote {out}/plan.json, search.json, loss.png")
    return 0


__all__ = ["SearchResult", "SearchStep", "as_batches", "byte_tokens", "calibration_from_files",
           "evaluate_plan", "forward_logits", "search_plan", "target_num_full"]
