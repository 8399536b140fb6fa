"""Group-limited sigmoid MoE routing in one launch (DeepSeek-V3 / GLM-4.5+ / DSA models' router tail).

Semantics (HF's DeepseekV3TopkRouter / GlmMoeDsaTopkRouter after their logits GEMV), per token t:

    s = sigmoid(logits[t])                      [E]
    c = s + bias                                the choice scores (bias: e_score_correction_bias)
    n_group > 1: group score = sum of the top 2 of c in each of n_group equal groups; only the
                 topk_group best groups keep their c, the others -inf
    ids[t] = the top_k experts by c;  weights[t] = s[ids[t]], / (sum + 1e-20) if renormalize, * scale

A decode step otherwise spends a handful of launches on this tail: the sigmoid / bias / mask
kernels, torch.topk's gatherTopK + sort per top-k (three of them before drop_trivial_topk removes
the two trivial ones at n_group = 1), the gather and the normalisation; ~16 us of GPU time per MoE
layer in the 47-layer profile (docs/benchmarks.md). Here one program per token holds the row of E
scores in registers: the group pick and the top_k are repeated arg-max passes over it (top_k <= 16,
E <= 1024), lowest index first among equal scores. Ids come out in descending choice-score order
(torch.topk(sorted=False) gives no order; the experts sum over them).

Reference: `reference.moe_route_ref` (HF's own torch code).
"""
from __future__ import annotations

import torch

from ._triton_utils import (HAS_TRITON, interpreting, jit_helper, launch_interpreted, let_next_kernel_launch,
                            new_output, next_pow2, pdl_launch, tl, triton, use_triton_for, wait_for_previous_kernel)
from .reference import moe_route_ref

MAX_EXPERTS = 1024  # a row of choice scores lives in one program's registers
MAX_TOPK = 16  # arg-max passes per token


def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    E, SCALE,
    sl_t, sl_e, sw_t, si_t,
    E_PAD: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, PDL: tl.constexpr = False,
):
    """weights[t, :TOPK] (fp32) and ids[t, :TOPK] (int64) of token t = program_id(0). PDL: launched
    early (_triton_utils.pdl), the logits read after the kernel before completes."""
    wait_for_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_PAD)
    weights, ids = route_row(logits_ptr + t * sl_t, sl_e, bias_ptr, E, SCALE, E_PAD, GROUPS, TOPK_GROUP, TOPK, K_PAD,
                             HAS_BIAS, RENORMALIZE)
    let_next_kernel_launch(PDL)
    tl.store(w_ptr + t * sw_t + k, weights, mask=k < TOPK)
    tl.store(ids_ptr + t * si_t + k, ids, mask=k < TOPK)


@jit_helper
def route_row(row_ptr, s_e, bias_ptr, E, SCALE, E_PAD: tl.constexpr, GROUPS: tl.constexpr,
              TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
              RENORMALIZE: tl.constexpr):
    """(weights fp32 [K_PAD], ids int64 [K_PAD]) of one token's logits row (E values, stride s_e);
    slots past TOPK hold 0. Also the experts op's gate/up kernel's prologue (moe_experts, route=)."""
    e = tl.arange(0, E_PAD)
    ok = e < E
    s = tl.sigmoid(tl.load(row_ptr + e * s_e, mask=ok, other=0.0).to(tl.float32))
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
    c = tl.where(ok, c, float("-inf"))
    if GROUPS > 1:
        c = _keep_best_groups(c, E_PAD, GROUPS, TOPK_GROUP)
    k = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], tl.int64)
    weights = tl.zeros([K_PAD], tl.float32)
    for r in tl.static_range(TOPK):
        best = tl.max(c, axis=0)
        pick = tl.min(tl.where(c == best, e, E_PAD), axis=0)  # the lowest index among equal scores
        ids = tl.where(k == r, pick.to(tl.int64), ids)
        weights = tl.where(k == r, tl.sum(tl.where(e == pick, s, 0.0), axis=0), weights)
        c = tl.where(e == pick, float("-inf"), c)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    return weights * SCALE, ids


@jit_helper
def _keep_best_groups(c, E_PAD: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """c [E_PAD] with every expert outside the TOPK_GROUP best groups (score: sum of its top 2) at -inf."""
    SIZE: tl.constexpr = E_PAD // GROUPS
    grouped = tl.reshape(c, (GROUPS, SIZE))
    j = tl.arange(0, SIZE)
    first = tl.max(grouped, axis=1)  # [GROUPS]
    at = tl.min(tl.where(grouped == first[:, None], j[None, :], SIZE), axis=1)
    second = tl.max(tl.where(j[None, :] == at[:, None], float("-inf"), grouped), axis=1)
    score = first + second
    g = tl.arange(0, GROUPS)
    keep = g < 0
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(tl.where(keep, float("-inf"), score), axis=0)
        pick = tl.min(tl.where((~keep) & (score == best), g, GROUPS), axis=0)
        keep = keep | (g == pick)
    return tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (E_PAD,))


if HAS_TRITON:
    _route_kernel_jit = triton.jit(_route_kernel)


def check_route_config(E: int, top_k: int, n_group: int, topk_group: int) -> str:
    """'' when the kernel takes this router, else why not."""
    if not 1 <= top_k <= min(MAX_TOPK, E) or E > MAX_EXPERTS:
        return f"top_k {top_k} of {E} experts (the kernel takes top_k <= {MAX_TOPK}, E <= {MAX_EXPERTS})"
    if n_group > 1 and (E % n_group or next_pow2(n_group) != n_group or next_pow2(E // n_group) != E // n_group):
        return f"{E} experts in {n_group} groups (the kernel takes power-of-two groups of power-of-two size)"
    if not 1 <= topk_group <= n_group:
        return f"topk_group {topk_group} of {n_group} groups"
    return ""


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
              renormalize: bool = True, scale: float = 1.0, use_triton: bool | None = None):
    """logits [T,E] -> (weights fp32 [T,top_k], ids int64 [T,top_k]); see the module docstring."""
    T, E = logits.shape
    why = check_route_config(E, top_k, n_group, topk_group)
    if why:
        raise ValueError(f"moe_route: {why}")
    if not use_triton_for(logits, use_triton):
        return moe_route_ref(logits, bias, top_k, n_group, topk_group, renormalize, scale)
    weights = new_output((T, top_k), torch.float32, logits.device)
    ids = new_output((T, top_k), torch.int64, logits.device)
    if T == 0:
        return weights, ids
    e_pad = max(next_pow2(E), n_group)
    args = (logits, bias if bias is not None else logits, weights, ids, E, float(scale),
            *logits.stride(), weights.stride(0), ids.stride(0))
    consts = dict(E_PAD=e_pad, GROUPS=n_group, TOPK_GROUP=topk_group, TOPK=top_k, K_PAD=next_pow2(top_k),
                  HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize))
    if interpreting(logits):
        launch_interpreted(_route_kernel, (T,), *args, **consts)
    else:
        _route_kernel_jit[(T,)](*args, **consts, **pdl_launch(logits.device), num_warps=1 if e_pad <= 128 else 4)
    return weights, ids


__all__ = ["moe_route", "check_route_config", "MAX_EXPERTS", "MAX_TOPK"]
