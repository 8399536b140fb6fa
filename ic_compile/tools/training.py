"""Training-aware IndexCache: multi-layer indexer distillation (DESIGN.md §6).

For each F layer f of a plan, G(f) = {f} ∪ {the S layers that reuse f's top-k}. The target is

    p_f = mean over l in G(f) of  normalize_L1( sum_h A_l[b, h, s, :] )      (detached)

and the loss is KL(p_f || softmax(I_f)) over the key axis, I_f being layer f's indexer scores: over all
allowed (causal) keys in the dense warm-up stage, over f's selected top-k keys in the sparse stage.
With G(f) = {f} (an all-F plan) this is DeepSeek-V3.2's single-layer indexer warm-up loss.

Reduction: the per-query KL is averaged over the queries that have at least one allowed key, then
averaged over F layers.

    logits, aux = model.forward_aux(ids, pattern=plan.pattern, dense=False)   # reference model
    loss = multi_layer_distillation_loss(aux["index_scores"], aux["attention_probs"], plan,
                                         topk_indices=aux["topk"])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import IndexCacheError
from ..plan import FULL, LayerPlan, PlanError


class TrainingInputError(IndexCacheError, ValueError):
    """Distillation-loss inputs of the wrong kind or shape; the message says which and what was expected."""


def serving_groups(plan) -> dict[int, list[int]]:
    """F layer -> the layers whose top-k it provides (itself first, then its S layers)."""
    plan = LayerPlan.coerce(plan)
    groups: dict[int, list[int]] = {}
    for layer, source in enumerate(plan.sources()):
        groups.setdefault(source, []).append(layer)
    return groups


def _check_inputs(indexer_scores, attention_probs, plan):
    if not isinstance(attention_probs, dict) or not attention_probs:
        raise TrainingInputError("attention_probs must be a non-empty dict {layer: Tensor[B, H, S, T]}")
    if not isinstance(indexer_scores, dict):
        raise TrainingInputError("indexer_scores must be a dict {F layer: Tensor[B, S, T]}")
    n = len(attention_probs)
    if sorted(attention_probs) != list(range(n)):
        raise TrainingInputError(f"attention_probs must have one entry per layer 0..{n - 1} (indexer-layer order), "
                        f"got layers {sorted(attention_probs)}")
    if plan is None:
        raise PlanError("plan is required: a pattern like 'FSSF' or a LayerPlan")
    plan = LayerPlan.coerce(plan, n)
    if len(plan) != n:
        raise PlanError(f"plan {plan.pattern!r} has {len(plan)} layers but attention_probs has {n}; "
                        "give one 'F'/'S' per layer")
    missing = [i for i, role in enumerate(plan.pattern) if role == FULL and i not in indexer_scores]
    if missing:
        raise TrainingInputError(f"indexer_scores has no entry for F layers {missing} of plan {plan.pattern!r}")
    return plan


def _head_summed(probs: Tensor) -> Tensor:
    """[B, H, S, T] -> [B, S, T]: summed over heads, L1-normalised over keys (0 rows stay 0)."""
    if probs.dim() != 4:
        raise TrainingInputError(f"attention probabilities must be [B, H, S, T], got shape {tuple(probs.shape)}")
    summed = _upcast(probs.detach()).sum(1)
    return summed / summed.sum(-1, keepdim=True).clamp_min(1e-30)


def _upcast(t: Tensor) -> Tensor:
    """fp32 at least (bf16/fp16 inputs are upcast; fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _kl(p: Tensor, log_q: Tensor) -> Tensor:
    """Per-query KL(p || q) over the last axis; terms with p == 0 contribute 0."""
    positive = p > 0
    term = torch.where(positive, p * (p.clamp_min(1e-30).log() - log_q.masked_fill(~positive, 0.0)),
                       torch.zeros_like(p))
    return term.sum(-1)


def multi_layer_distillation_loss(indexer_scores: dict[int, Tensor], attention_probs: dict[int, Tensor],
                                  plan, mask: Tensor | None = None,
                                  topk_indices: dict[int, Tensor] | Tensor | None = None) -> Tensor:
    """Mean over F layers f of mean over queries of KL(p_f || softmax(I_f)).

    indexer_scores {f: [B, S, T]} for every F layer (entries for S layers are ignored);
    attention_probs {l: [B, H, S, T]} for every layer; mask: bool, True = allowed key, broadcastable to
    [B, S, T] (default causal, the last S of T keys being the queries); topk_indices {f: [B, S, K]}
    (or one tensor when the plan has one F layer): sparse stage — KL over each query's selected keys."""
    plan = _check_inputs(indexer_scores, attention_probs, plan)
    groups = serving_groups(plan)
    if topk_indices is not None and not isinstance(topk_indices, dict):
        if len(groups) != 1:
            raise TrainingInputError(f"topk_indices must be a dict {{F layer: [B, S, K]}} for plan {plan.pattern!r} "
                            f"with {len(groups)} F layers")
        topk_indices = {next(iter(groups)): topk_indices}
    losses = []
    for f, group in groups.items():
        scores = indexer_scores[f]
        if scores.dim() != 3:
            raise TrainingInputError(f"indexer_scores[{f}] must be [B, S, T], got shape {tuple(scores.shape)}")
        B, S, T = scores.shape
        target = None
        for layer in group:
            probs = attention_probs[layer]
            if probs.dim() != 4 or (probs.shape[0], probs.shape[2], probs.shape[3]) != (B, S, T):
                raise TrainingInputError(f"attention_probs[{layer}] has shape {tuple(probs.shape)}; expected "
                                f"[{B}, H, {S}, {T}] to match indexer_scores[{f}]")
            p = _head_summed(probs)
            target = p if target is None else target + p
        target = target / len(group)
        allowed = _allowed(mask, B, S, T, scores.device)
        scores = _upcast(scores)
        if topk_indices is None:  # dense: every allowed key
            log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            p = target.masked_fill(~allowed, 0.0)
        else:
            if f not in topk_indices:
                raise TrainingInputError(f"topk_indices has no entry for F layer {f}")
            index = topk_indices[f].long()
            if index.shape[:2] != (B, S):
                raise TrainingInputError(f"topk_indices[{f}] must be [{B}, {S}, K], got {tuple(index.shape)}")
            valid = allowed.gather(-1, index)  # [B, S, K]
            log_q = scores.gather(-1, index).masked_fill(~valid, float("-inf")).log_softmax(-1)
            p = target.gather(-1, index).masked_fill(~valid, 0.0)
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        has_key = p.sum(-1) > 0  # queries with some target mass on allowed keys
        kl = _kl(p, log_q)
        losses.append(kl[has_key].mean() if has_key.any() else kl.sum() * 0.0)
    return torch.stack(losses).mean()


def _allowed(mask, B, S, T, device) -> Tensor:
    if mask is None:
        query_pos = torch.arange(S, device=device)[:, None] + (T - S)
        return (torch.arange(T, device=device)[None, :] <= query_pos).expand(B, S, T)
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype != torch.bool:
        raise TrainingInputError(f"mask must be bool (True = allowed key), got {mask.dtype}")
    try:
        return mask.expand(B, S, T)
    except RuntimeError as exc:
        raise TrainingInputError(f"mask of shape {tuple(mask.shape)} does not broadcast to [{B}, {S}, {T}]") from exc


# ============================================================== reference-model helpers

@dataclass
class DistillationInputs:
    logits: Tensor  # [B, S, vocab]
    indexer_scores: dict[int, Tensor]  # F layers: [B, S, T], differentiable w.r.t. indexer weights only
    attention_probs: dict[int, Tensor]  # every layer: [B, H, S, T]
    topk_indices: dict[int, Tensor]  # F layers: [B, S, K] (empty in the dense stage)


def collect_distillation_inputs(model: nn.Module, ids: Tensor, plan=None, *, dense: bool = False,
                                detach_indexer_input: bool = True) -> DistillationInputs:
    """One forward of the reference model (ic_compile/dsa_model.py) returning logits, every F layer's
    indexer scores and every layer's attention probabilities. The indexer reads detached hidden states
    (DeepSeek), so a distillation loss on these scores trains the indexers only."""
    if not hasattr(model, "forward_aux"):
        raise TypeError(f"{type(model).__name__} has no forward_aux(); collect_distillation_inputs needs "
                        "the reference model of ic_compile/dsa_model.py")
    n = len(model.layers)
    plan = LayerPlan.coerce(plan, n) if plan is not None else LayerPlan(model.args.pattern)
    if len(plan) != n:
        raise PlanError(f"plan {plan.pattern!r} has {len(plan)} layers, the model has {n}")
    logits, aux = model.forward_aux(ids, pattern=plan.pattern, dense=dense,
                                    detach_indexer_input=detach_indexer_input)
    return DistillationInputs(logits, aux["index_scores"], aux["attention_probs"],
                              {} if dense else aux["topk"])


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    from ..reference import find_indexer_modules
    return [p for m in find_indexer_modules(model) for p in m.parameters()]


def non_indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    ids = {id(p) for p in indexer_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def freeze_all_but_indexers(model: nn.Module) -> None:
    """Indexer warm-up: only indexer weights train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in indexer_parameters(model):
        p.requires_grad_(True)


__all__ = ["DistillationInputs", "collect_distillation_inputs", "freeze_all_but_indexers", "indexer_parameters",
           "multi_layer_distillation_loss", "non_indexer_parameters", "serving_groups"]
