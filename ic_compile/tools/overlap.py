"""Cross-layer top-k overlap (`ic overlap`) and the baseline plans built from it.

    matrix = topk_overlap(model, ids)            # [n, n] mean Jaccard of the selected key sets
    overlap_plan(matrix, num_full=2)             # F layers chosen to maximise the S layers' overlap
    uniform_plan(8, 2)                           # LayerPlan("FSSSFSSS")

Each indexer module's output (its top-k key ids, [B, S, K]) is captured with forward hooks on the
modules `ic_compile.reference.find_indexer_modules` finds, so the model must run every indexer (all F).
Only queries with more than K allowed (causal) keys count: before that every layer selects all keys.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from ..plan import FULL, SHARED, LayerPlan, PlanError
from ..reference import find_indexer_modules
from .calibration import as_batches, to_device
from .evaluators import forward_logits
from .models import vocab_size


def _set_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [..., K] index sets (distinct entries) -> Jaccard |a∩b| / |a∪b| [...]."""
    a, b = a.long().sort(-1).values, b.long().sort(-1).values
    pos = torch.searchsorted(b, a).clamp_max(b.shape[-1] - 1)
    inter = (b.gather(-1, pos) == a).sum(-1).double()
    return inter / (a.shape[-1] + b.shape[-1] - inter)


@torch.no_grad()
def collect_topk(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each indexer layer's top-k ids [B, S, K] for one batch (forward hooks on the indexers)."""
    indexers = find_indexer_modules(model)
    if not indexers:
        raise PlanError("overlap: the model has no indexer modules (named 'indexer' or *Indexer)")
    outputs: list = [None] * len(indexers)

    def hook(i):
        def keep(_module, _inputs, output):
            outputs[i] = output[0] if isinstance(output, (tuple, list)) else output
        return keep

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(indexers)]
    try:
        forward_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, o in enumerate(outputs) if o is None]
    if missing:
        raise PlanError(f"overlap: indexer layers {missing} did not run (S layers of a model built with "
                        "a plan?); overlap needs a model that runs every indexer")
    return outputs


def topk_overlap(model: nn.Module, data, *, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Mean Jaccard overlap [n, n] (float64) of the top-k sets of every pair of indexer layers,
    averaged over the queries that have more than K allowed keys. data: as `search_plan`'s calibration.
    progress: a tqdm bar over the batches, on stderr."""
    from tqdm.auto import tqdm
    batches = to_device(as_batches(data, batch_size, vocab_size=vocab_size(model)), model)
    total, count = None, 0
    for ids in tqdm(batches, desc="overlap", unit="batch", disable=not progress, leave=False, file=sys.stderr):
        topk = collect_topk(model, ids)
        k = topk[0].shape[-1]
        if any(t.shape != topk[0].shape for t in topk):
            raise PlanError(f"overlap: indexer outputs differ in shape {[tuple(t.shape) for t in topk]}")
        seq = topk[0].shape[1]
        if seq <= k:
            continue
        keep = slice(k, seq)  # query s has s + 1 allowed keys; > K from s = K on
        sel = [t[:, keep] for t in topk]
        n = len(sel)
        batch_sum = torch.ones(n, n, dtype=torch.float64)
        q = sel[0].shape[0] * sel[0].shape[1]
        batch_sum *= q
        for i in range(n):
            for j in range(i + 1, n):
                batch_sum[i, j] = batch_sum[j, i] = _set_jaccard(sel[i], sel[j]).sum().item()
        total = batch_sum if total is None else total + batch_sum
        count += q
    if total is None:
        raise ValueError("overlap: no query has more than top-k allowed keys; use sequences longer than "
                         "the indexer's k")
    return total / count


def uniform_plan(num_layers: int, num_full: int) -> LayerPlan:
    """num_full F layers spread evenly, the first at layer 0: uniform_plan(8, 2) == 'FSSSFSSS'."""
    if not 1 <= num_full <= num_layers:
        raise ValueError(f"num_full must be between 1 and num_layers ({num_layers}), got {num_full}")
    full = {(i * num_layers) // num_full for i in range(num_full)}
    return LayerPlan("".join(FULL if i in full else SHARED for i in range(num_layers)))


def overlap_plan(matrix, num_full: int) -> LayerPlan:
    """The plan with num_full F layers maximising sum over S layers of overlap(S, its F source).

    Exact, by dynamic programming over contiguous segments (each F layer serves the S layers up to the
    next F layer): O(n² · num_full)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    n = m.shape[0]
    if m.dim() != 2 or m.shape[1] != n:
        raise ValueError(f"overlap matrix must be square, got {tuple(m.shape)}")
    if not 1 <= num_full <= n:
        raise ValueError(f"num_full must be between 1 and the number of layers ({n}), got {num_full}")

    def segment(f: int, end: int) -> float:  # F layer f serving f+1..end-1
        return float(m[f, f + 1:end].sum())

    neg = float("-inf")
    # best[c][e]: best score of layers 0..e-1 split into c segments, the first starting at 0
    best = [[neg] * (n + 1) for _ in range(num_full + 1)]
    back = [[-1] * (n + 1) for _ in range(num_full + 1)]
    for e in range(1, n + 1):
        best[1][e] = segment(0, e)
    for c in range(2, num_full + 1):
        for e in range(c, n + 1):
            for f in range(c - 1, e):  # last segment starts at f
                if best[c - 1][f] == neg:
                    continue
                score = best[c - 1][f] + segment(f, e)
                if score > best[c][e]:
                    best[c][e], back[c][e] = score, f
    starts, e = [], n
    for c in range(num_full, 1, -1):
        f = back[c][e]
        starts.append(f)
        e = f
    starts.append(0)
    full = set(starts)
    return LayerPlan("".join(FULL if i in full else SHARED for i in range(n)))


def overlap_report(matrix: torch.Tensor, num_full: int | None = None) -> dict:
    n = matrix.shape[0]
    report = {"num_layers": n, "matrix": [[round(float(v), 6) for v in row] for row in matrix],
              "adjacent_mean": float(torch.diagonal(matrix, 1).mean()) if n > 1 else 1.0}
    if num_full is not None:
        report["num_full"] = num_full
        report["overlap_plan"] = overlap_plan(matrix, num_full).pattern
        report["uniform_plan"] = uniform_plan(n, num_full).pattern
    return report


def plot_overlap(matrix: torch.Tensor, path: str | os.PathLike, title: str = "top-k Jaccard overlap") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n, 1.2 + 0.4 * n))
    im = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    if n <= 24:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=7,
                        color="w" if matrix[i, j] < 0.6 else "k")
    ax.set_xlabel("indexer layer")
    ax.set_ylabel("indexer layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["collect_topk", "overlap_plan", "overlap_report", "plot_overlap", "topk_overlap", "uniform_plan"]
