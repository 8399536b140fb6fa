"""Greedy, training-free plan search (IndexCache paper, DESIGN.md §6).

    result = search_plan(model, calibration_ids, num_full=2)      # or ratio=0.25 / loss_budget=0.05
    result.plan            # LayerPlan("FSSFSSSS")
    result.to_json("search.json"); result.plot("loss.png")

Start with every indexer layer F. Each step tries every F layer but the first as S, measures the
objective on the calibration set and keeps the best candidate; it stops at `num_full` F layers, at a
`ratio` of F layers, or before the best candidate's loss exceeds the all-F loss by `loss_budget`.

What is measured is what the backend runs: the evaluators ("graph": the rewritten Dynamo graph, any
model; "prefix": the reference model rerun from the first changed layer; "auto") and the objectives
("lm_loss", "kl") are in `ic_compile.tools.evaluators`; calibration data (tensors, batches, text files)
in `ic_compile.tools.calibration`. The model is put in eval mode for the search.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..plan import FULL, SHARED, LayerPlan, PlanError
from .calibration import as_batches, byte_tokens, calibration_from_files, to_device  # noqa: F401 (re-exported)
from .evaluators import (CACHE_LIMIT_BYTES, OBJECTIVES, Objective, eval_mode, evaluate_plan,  # noqa: F401
                         forward_logits, make_evaluator, plan_loss)
from .models import vocab_size


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
    with eval_mode(model):
        return _search(model, calibration, num_full, ratio, loss_budget, objective, progress, batch_size,
                       init, evaluator, seq_len, tokenizer, cache_limit_bytes)


def _search(model, calibration, num_full, ratio, loss_budget, objective, progress, batch_size, init,
            evaluator, seq_len, tokenizer, cache_limit_bytes) -> SearchResult:
    start_time = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
    if loss_budget is not None and not (isinstance(loss_budget, (int, float)) and loss_budget >= 0):
        raise ValueError(f"loss_budget must be a number >= 0, got {loss_budget!r}")
    if num_full is not None and ratio is not None:
        raise ValueError("give either num_full or ratio, not both")
    batches = to_device(as_batches(calibration, batch_size, seq_len=seq_len, tokenizer=tokenizer,
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
    full_loss = plan_loss(ev, obj, batches, all_full)  # also fills the prefix cache / KL reference
    evaluations += 1
    _advance(bar, F=n, plan=all_full, loss=full_loss)
    if current.pattern != all_full:
        ev.accept(current.pattern)
        current_loss = plan_loss(ev, obj, batches, current.pattern)
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
            candidates[layer] = plan_loss(ev, obj, batches, pattern)
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


__all__ = ["SearchResult", "SearchStep", "as_batches", "byte_tokens", "calibration_from_files",
           "evaluate_plan", "forward_logits", "search_plan", "target_num_full"]
