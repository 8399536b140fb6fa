"""Routed MoE experts for a few tokens (batch-1 decode): read only the active experts' weights.

Semantics (HF's GlmMoeDsaExperts.forward): hidden [T,H], topk_index [T,k] (int32/int64),
topk_weights [T,k] (fp32 or hidden's dtype), gate_up [E,2I,H], down [E,H,I] (hidden's dtype):

    out[t] = sum_j w[t,j] * down[e] @ (silu(g) * u),   (g, u) = (gate_up[e] @ hidden[t]).chunk(2),
    e = topk_index[t,j]; an index outside [0, E) (HF's sentinel E, expert-parallel engines' -1)
    contributes nothing. swiglu_limit L (DeepSeek-V4's experts): g capped at L and u clamped to
    [-L, L] before silu(g) * u. A shared expert (gate [IS,H], up [IS,H], down [H,IS]: HF's
    `shared_experts` MLP, capped by L too) adds down @ (silu(gate @ x[t]) * (up @ x[t])) to every token.

HF's grouped_mm path sorts the T*k (token, expert) pairs, histograms them and runs two grouped
GEMMs: at T = 1 that is ~61 us per layer on an H100 for ~25 us of weight reads (4 experts of
GLM-4.7-Flash, 75 MB). Here two memory-bound GEMV kernels, no sort, no host sync:
  1. `_gate_up_kernel`, grid (T*k, cdiv(I, BLOCK_N)): program (pair p = t*k + j, row block) streams
     the BLOCK_N gate rows and the matching BLOCK_N up rows of expert e over H in [BLOCK_N, BLOCK_K]
     tiles, multiplies them by hidden[t] elementwise into fp32 [BLOCK_N, BLOCK_K] accumulators
     (one reduction at the end, not one per step), and writes silu(g) * u rounded to hidden's dtype
     (HF rounds there too) into inter [T*k, I]. An invalid expert: no weight read, zeros written.
  2. `_down_kernel`, grid (T, cdiv(H, BLOCK_N)): program (token, row block) streams the BLOCK_N down
     rows of each of the token's k experts over I, acc += w[t,j] * tile * inter[p] (fp32), and
     stores the row block once: deterministic, no atomics; invalid experts' tiles are masked (no
     memory access). The k experts run as one flat loop, so loads stay pipelined across experts.
With a shared expert, kernel 1 has T more programs per row block (program T*k + t: token t's shared
gate/up rows, into its own [T, IS] buffer) and kernel 2 runs a second loop over the shared down rows
(weight 1) into the same accumulator: its ~19 MB (GLM-4.7-Flash) are read in the op's two launches
instead of HF's five (three GEMVs, silu * mul, the add).
With a route (moe_route_experts: the router's logits and settings instead of ids and weights), each
kernel-1 program routes its token itself with the route kernel's code (moe_router.route_row: the same
ids and weights, bit for bit) and the row-block-0 programs write them for kernel 2: one launch fewer
per MoE layer at decode, for 64 logits re-read per program (passes/fold_moe_route.py).
The pair / token is the grid's fast axis: the programs reading the same row block of different
pairs run side by side, so an expert shared by several tokens (T > 1) is mostly read from L2.
Each (token, expert) pair still reads its expert once: the work grows with T*k, so this is for
decode-sized T; a prefill wants the grouped GEMM (the caller chooses, this op does not switch).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._triton_utils import (
    HAS_TRITON,
    cdiv,
    interpreting,
    jit_helper,
    launch_interpreted,
    let_next_kernel_launch,
    line_elems,
    new_output,
    next_pow2,
    num_sms,
    pdl_launch,
    prefetch_rows_to_l2,
    tl,
    triton,
    use_triton_for,
    wait_for_previous_kernel,
)
from .moe_router import check_route_config, route_row
from .reference import moe_experts_ref, moe_route_ref


@jit_helper
def _swiglu_rows(
    x_row, sx_h, gate_rows, up_rows, sg_h, su_h, n_ok, out_ptrs, H, h_end, LIMIT,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, CLAMP: tl.constexpr,
):
    """out_ptrs[n] = silu(gate_rows[n] . x) * (up_rows[n] . x) over H columns (h_end = 0: no weight
    read, zeros); gate_rows / up_rows / out_ptrs [BLOCK_N] pointers. CLAMP: the gate capped at LIMIT,
    the up value clamped to [-LIMIT, LIMIT] first."""
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for h0 in tl.range(0, h_end, BLOCK_K, num_stages=STAGES):
        h = h0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        h_ok = h < H
        x = tl.load(x_row + h * sx_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        ok = n_ok[:, None] & h_ok[None, :]
        acc_g += tl.load(gate_rows[:, None] + h[None, :] * sg_h, mask=ok, other=0.0).to(tl.float32) * x
        acc_u += tl.load(up_rows[:, None] + h[None, :] * su_h, mask=ok, other=0.0).to(tl.float32) * x
    g = tl.sum(acc_g, axis=1)  # [BLOCK_N]
    u = tl.sum(acc_u, axis=1)
    if CLAMP:
        g = tl.minimum(g, LIMIT)
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
    act = g * tl.sigmoid(g) * u  # silu(g) * u in fp32
    tl.store(out_ptrs, act.to(out_ptrs.dtype.element_ty), mask=n_ok)


def _gate_up_kernel(
    x_ptr, idx_ptr, gu_ptr, inter_ptr, sgate_ptr, sup_ptr, sinter_ptr,
    H, I, E, TOPK, ROUTED, IS, LIMIT,
    sx_t, sx_h,  # hidden [T, H]
    si_t, si_j,  # topk_index [T, k]
    sg_e, sg_n, sg_h,  # gate_up [E, 2I, H]
    sm_p, sm_i,  # inter [T*k, I]
    ssg_n, ssg_h, ssu_n, ssu_h,  # shared gate [IS, H], shared up [IS, H]
    ssm_t, ssm_i,  # shared inter [T, IS]
    logits_ptr, bias_ptr, w_ptr, ROUTE_SCALE,  # ROUTE: router logits [T, E], bias [E], topk_weights out [T, k]
    sl_t, sl_e, sw_t, sw_j,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, CLAMP: tl.constexpr,
    SHARED: tl.constexpr, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    LINE_ELEMS: tl.constexpr = 64, ROUTE: tl.constexpr = False, E_PAD: tl.constexpr = 1,
    GROUPS: tl.constexpr = 1, TOPK_GROUP: tl.constexpr = 1, ROUTE_TOPK: tl.constexpr = 1, K_PAD: tl.constexpr = 1,
    HAS_BIAS: tl.constexpr = False, RENORMALIZE: tl.constexpr = False,
):
    """Program (pair, row block): a routed pair p = t*k + j < ROUTED writes inter[p, rows] =
    silu(gate_up[e, rows] . x[t]) * (gate_up[e, I + rows] . x[t]); with SHARED, program ROUTED + t
    writes token t's shared expert, shared_inter[t, rows] = silu(gate[rows] . x[t]) * (up[rows] . x[t]).
    ROUTE: e is not read from topk_index but routed here from the router's logits (moe_router.route_row,
    the moe_route kernel's code: the same ids and weights), and the pair's row-block-0 program writes
    them to topk_index / topk_weights for the down kernel. PDL (_triton_utils.pdl): launched early; the
    shared expert's rows are prefetched into L2 before the routing (the kernel before's output) can be read."""
    pair = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_N
    n = row0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of the gate half
    if PREFETCH and SHARED:
        if (pair >= ROUTED) & (ssg_h == 1) & (ssu_h == 1):  # (rows of unit stride: what the prefetch reads)
            kept = tl.minimum(n, IS - 1)  # rows past IS: row IS - 1 again
            prefetch_rows_to_l2(sgate_ptr + kept * ssg_n, H, LINE_ELEMS, 16)
            prefetch_rows_to_l2(sup_ptr + kept * ssu_n, H, LINE_ELEMS, 16)
    wait_for_previous_kernel(PDL)
    if pair < ROUTED:
        t = pair // TOPK
        if ROUTE:
            e = _routed_expert(logits_ptr + t.to(tl.int64) * sl_t, sl_e, bias_ptr, idx_ptr + t * si_t, si_j,
                               w_ptr + t * sw_t, sw_j, pair % TOPK, E, ROUTE_SCALE, E_PAD, GROUPS, TOPK_GROUP,
                               ROUTE_TOPK, K_PAD, HAS_BIAS, RENORMALIZE)
        else:
            e = tl.load(idx_ptr + t * si_t + (pair % TOPK) * si_j)
        valid = (e >= 0) & (e < E)
        h_end = tl.where(valid & (row0 < I), H, 0)  # invalid expert / rows past I: no step, zeros out
        gate_rows = gu_ptr + tl.where(valid, e, 0).to(tl.int64) * sg_e + n * sg_n  # [BLOCK_N]
        _swiglu_rows(x_ptr + t.to(tl.int64) * sx_t, sx_h, gate_rows, gate_rows + I * sg_n, sg_h, sg_h, n < I,
                     inter_ptr + pair.to(tl.int64) * sm_p + n * sm_i, H, h_end, LIMIT,
                     BLOCK_N, BLOCK_K, STAGES, CLAMP)
    if SHARED:
        if pair >= ROUTED:
            t = pair - ROUTED
            h_end = tl.where(row0 < IS, H, 0)
            _swiglu_rows(x_ptr + t.to(tl.int64) * sx_t, sx_h, sgate_ptr + n * ssg_n, sup_ptr + n * ssu_n, ssg_h,
                         ssu_h, n < IS, sinter_ptr + t.to(tl.int64) * ssm_t + n * ssm_i, H, h_end, LIMIT,
                         BLOCK_N, BLOCK_K, STAGES, CLAMP)
    let_next_kernel_launch(PDL)


@jit_helper
def _routed_expert(row_ptr, sl_e, bias_ptr, ids_row, si_j, w_row, sw_j, j, E, SCALE, E_PAD: tl.constexpr,
                   GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, K_PAD: tl.constexpr,
                   HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr):
    """Expert id of slot j of a token's routing (logits row at row_ptr); the row-block-0 program also
    stores the slot's id and weight at ids_row / w_row."""
    weights, ids = route_row(row_ptr, sl_e, bias_ptr, E, SCALE, E_PAD, GROUPS, TOPK_GROUP, TOPK, K_PAD, HAS_BIAS,
                             RENORMALIZE)
    slot = tl.arange(0, K_PAD) == j
    e = tl.sum(tl.where(slot, ids, 0), axis=0)
    if tl.program_id(1) == 0:
        tl.store(ids_row + j * si_j, e)
        tl.store(w_row + j * sw_j, tl.sum(tl.where(slot, weights, 0.0), axis=0))
    return e


def _down_kernel(
    inter_ptr, idx_ptr, w_ptr, down_ptr, out_ptr, sinter_ptr, sdown_ptr,
    H, I, E, TOPK, IS,
    sm_p, sm_i,  # inter [T*k, I]
    si_t, si_j,  # topk_index [T, k]
    sw_t, sw_j,  # topk_weights [T, k]
    sd_e, sd_n, sd_i,  # down [E, H, I]
    so_t, so_h,  # out [T, H]
    ssm_t, ssm_i,  # shared inter [T, IS]
    ssd_n, ssd_i,  # shared down [H, IS]
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SHARED: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, LINE_ELEMS: tl.constexpr = 64,
):
    """out[t, n] = sum_j w[t, j] * down[e_j, n] . inter[t*k + j] (+ shared_down[n] . shared_inter[t]
    with SHARED) for this row block, summed in fp32 and rounded once. PDL: launched early; the
    shared expert's down rows are prefetched into L2 before the gate/up kernel's output is read."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    n_ok = n < H
    if PREFETCH and SHARED:
        if ssd_i == 1:
            prefetch_rows_to_l2(sdown_ptr + tl.minimum(n, H - 1) * ssd_n, IS, LINE_ELEMS, 16)
    wait_for_previous_kernel(PDL)
    steps = tl.cdiv(I, BLOCK_K)  # per expert
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for s in tl.range(0, TOPK * steps, num_stages=STAGES):  # (expert slot j, step) flattened: one pipelined loop
        j = s // steps
        i = (s - j * steps) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        e = tl.load(idx_ptr + t * si_t + j * si_j)
        valid = (e >= 0) & (e < E)
        # where, not a multiply: a sentinel slot's weight may be anything (NaN included)
        wt = tl.where(valid, tl.load(w_ptr + t * sw_t + j * sw_j).to(tl.float32), 0.0)
        i_ok = i < tl.where(valid, I, 0)  # (not `& valid`: the interpreter makes that mask int32)
        a = tl.load(inter_ptr + (t * TOPK + j).to(tl.int64) * sm_p + i * sm_i, mask=i_ok, other=0.0)
        rows = down_ptr + tl.where(valid, e, 0).to(tl.int64) * sd_e + n * sd_n  # [BLOCK_N]
        tile = tl.load(rows[:, None] + i[None, :] * sd_i, mask=n_ok[:, None] & i_ok[None, :], other=0.0)
        acc += tile.to(tl.float32) * (a.to(tl.float32) * wt)[None, :]
    if SHARED:  # weight 1
        for i0 in tl.range(0, IS, BLOCK_K, num_stages=STAGES):
            i = i0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            i_ok = i < IS
            a = tl.load(sinter_ptr + t.to(tl.int64) * ssm_t + i * ssm_i, mask=i_ok, other=0.0)
            tile = tl.load(sdown_ptr + n[:, None] * ssd_n + i[None, :] * ssd_i, mask=n_ok[:, None] & i_ok[None, :],
                           other=0.0)
            acc += tile.to(tl.float32) * a.to(tl.float32)[None, :]
    let_next_kernel_launch(PDL)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    tl.store(out_ptr + t.to(tl.int64) * so_t + n * so_h, y.to(out_ptr.dtype.element_ty), mask=n_ok)


# --------------------------------------------------------------------------- launch configs

class Tile(NamedTuple):
    """One kernel's launch: weight tile [block_n rows, block_k columns], warps, pipeline stages."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3  # the kernels' loop pipelining depth (tl.range), 1 = none


# A GEMV is bound by the weight bytes in flight, not by maths. Per step a program loads a
# [BLOCK_N, BLOCK_K] tile of TILE_ELEMS elements: at 4 warps that is 32 per thread, four 16-byte
# loads in bf16 (kernel 1 loads two tiles: gate and up). The loops are software-pipelined
# (tl.range num_stages: cp.async into shared memory; without it triton pipelines nothing here, as
# no dot consumes the loads), so STAGES - 1 further steps are in flight: kernel 1 holds 16 KB of
# tiles per step (34 KB of shared memory at 3 stages), kernel 2 8 KB (20 KB).
TILE_ELEMS = 4096
STAGES = 3
# BLOCK_N: the largest of these that still gives >= PROGRAMS_PER_SM programs per SM, so the few
# experts of a decode step are spread over every SM of an H100 (132 SMs): GLM-4.7-Flash at T = 1
# (k = 4, I = 1536, H = 2048) gets BLOCK_N 16 -> 384 gate/up programs and 4 -> 512 down programs.
# All are resident at once (AOT sm_90: kernel 1 126 registers -> 4 programs per SM, kernel 2 65 -> 7).
# Measured (bench/moe_experts.py --sweep, H100): at T = 1 these tiles are within 0.1 us of the
# fastest (30.5 us for the op); 32-row tiles were the slowest of every sweep (T = 4 gate/up: 98 vs
# 93 us at 16 rows and fewer), so 16 rows is the most: a taller tile only shortens each row's run.
ROW_BLOCKS = (16, 8, 4)
PROGRAMS_PER_SM = 2


def _tile(programs_per_row_block: int, rows: int, width: int, device: torch.device) -> Tile:
    """Tile for a weight of `rows` x `width` (the reduced dim) read by that many programs per row block."""
    target = PROGRAMS_PER_SM * num_sms(device)
    block_n = next((bn for bn in ROW_BLOCKS if programs_per_row_block * cdiv(rows, bn) >= target), ROW_BLOCKS[-1])
    block_n = min(block_n, max(ROW_BLOCKS[-1], next_pow2(rows)))
    return Tile(block_n, min(TILE_ELEMS // block_n, max(16, next_pow2(width))), 4, STAGES)


def default_tiles(T: int, k: int, H: int, I: int, device: torch.device, IS: int = 0) -> tuple[Tile, Tile]:
    """(gate_up tile, down tile) for T tokens of top-k routing (and a shared expert of width IS)."""
    return _tile(T * k + (T if IS else 0), max(I, IS), H, device), _tile(T, H, I, device)


def sweep_tiles() -> list[Tile]:
    """Candidates for either kernel (bench/moe_experts.py; each checked on a GPU by the tests):
    every row block, the default tile size and twice it (at 8 warps: the same per thread), with
    and without loop pipelining, and 2 / 4 stages at the default size."""
    tiles = []
    for bn in ROW_BLOCKS:
        tiles += [Tile(bn, TILE_ELEMS // bn, 4, stages) for stages in (1, 2, 3, 4)]
        tiles += [Tile(bn, 2 * TILE_ELEMS // bn, 8, stages) for stages in (1, 3)]
    return tiles


# --------------------------------------------------------------------------- host side

_JIT: dict = {}


def _launch(fn, grid, args: tuple, tile: Tile, like: torch.Tensor, **constexprs) -> None:
    meta = {"BLOCK_N": tile.block_n, "BLOCK_K": tile.block_k, "STAGES": tile.num_stages, **constexprs}
    if interpreting(like):
        launch_interpreted(fn, grid, *args, **meta)
        return
    if fn not in _JIT:
        _JIT[fn] = triton.jit(fn)
    _JIT[fn][grid](*args, **meta, **pdl_launch(like.device, prefetch=True), LINE_ELEMS=line_elems(like),
                   num_warps=tile.num_warps)


def _check(hidden, topk_index, topk_weights, gate_up, down) -> tuple[int, int, int, int, int]:
    """-> (T, H, k, E, I); raises ValueError on shapes / dtypes the kernels do not take."""
    T, H = hidden.shape
    k = topk_index.shape[1]
    E, two_i, h_gu = gate_up.shape
    I = two_i // 2
    if topk_index.shape != (T, k) or topk_weights.shape != (T, k) or h_gu != H or two_i != 2 * I \
            or down.shape != (E, H, I):
        raise ValueError(f"moe_experts: shapes hidden {tuple(hidden.shape)}, topk_index {tuple(topk_index.shape)}, "
                         f"topk_weights {tuple(topk_weights.shape)}, gate_up {tuple(gate_up.shape)}, "
                         f"down {tuple(down.shape)} (want [T,H], [T,k], [T,k], [E,2I,H], [E,H,I])")
    if gate_up.dtype != hidden.dtype or down.dtype != hidden.dtype or topk_index.dtype.is_floating_point:
        raise ValueError(f"moe_experts: gate_up / down must be in hidden's dtype {hidden.dtype} (got {gate_up.dtype}, "
                         f"{down.dtype}), topk_index an integer tensor (got {topk_index.dtype})")
    return T, H, k, E, I


def _check_shared(hidden, shared: tuple | None) -> int:
    """-> the shared expert's width IS (0 without one); raises ValueError on shapes / dtypes the kernels do not take."""
    if shared is None:
        return 0
    if any(w is None for w in shared):
        raise ValueError("moe_experts: give all of shared_gate, shared_up and shared_down, or none")
    gate, up, down = shared
    H = hidden.shape[1]
    IS = gate.shape[0]
    if gate.shape != (IS, H) or up.shape != (IS, H) or down.shape != (H, IS):
        raise ValueError(f"moe_experts: shared expert shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.shape)} (want [IS,{H}], [IS,{H}], [{H},IS]: nn.Linear weights)")
    if any(w.dtype != hidden.dtype for w in shared):
        raise ValueError(f"moe_experts: the shared expert's weights must be in hidden's dtype {hidden.dtype} "
                         f"(got {[w.dtype for w in shared]})")
    return IS


class Route(NamedTuple):
    """A router's logits and settings (kernels/moe_router.py), routed inside the experts op."""
    logits: torch.Tensor  # [T, E]
    bias: torch.Tensor | None  # [E]
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = True
    scale: float = 1.0


def moe_experts_triton(
    hidden: torch.Tensor, topk_index: torch.Tensor | None, topk_weights: torch.Tensor | None, gate_up: torch.Tensor,
    down: torch.Tensor, tiles: tuple[Tile, Tile] | None = None, swiglu_limit: float | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, route: Route | None = None,
) -> torch.Tensor:
    """Triton path (CPU tensors run in the Triton interpreter) -> [T, H] in hidden's dtype.

    shared: (gate [IS,H], up [IS,H], down [H,IS]) of a shared expert added to every token (weight 1).
    route: the routing computed in the gate/up kernel from these logits (topk_index / topk_weights
    None): one launch fewer than moe_route + the experts.
    tiles: (gate_up tile, down tile) to launch instead of default_tiles (bench/moe_experts.py)."""
    if route is not None:
        topk_index, topk_weights = _route_outputs(hidden, route, gate_up.shape[0])
    T, H, k, E, I = _check(hidden, topk_index, topk_weights, gate_up, down)
    IS = _check_shared(hidden, shared)
    out = new_output((T, H), hidden.dtype, hidden.device)
    if T == 0 or H == 0 or (IS == 0 and (k == 0 or I == 0)):
        return out.zero_()
    inter = new_output((T * k, I), hidden.dtype, hidden.device)  # silu(g) * u, rounded like HF's
    s_inter = new_output((T, IS), hidden.dtype, hidden.device)  # the shared expert's
    s_gate, s_up, s_down = shared if shared is not None else (hidden, hidden, hidden)  # not read without SHARED
    s_strides = (*s_gate.stride(), *s_up.stride()) if shared is not None else (0, 0, 0, 0)
    up_tile, down_tile = tiles or default_tiles(T, k, H, I, hidden.device, IS)
    route_args, route_meta = _route_launch(route, topk_weights, E)
    _launch(_gate_up_kernel, (T * k + (T if IS else 0), cdiv(max(I, IS), up_tile.block_n)),
            (hidden, topk_index, gate_up, inter, s_gate, s_up, s_inter, H, I, E, k, T * k, IS,
             float(swiglu_limit or 0.0), *hidden.stride(), *topk_index.stride(), *gate_up.stride(), *inter.stride(),
             *s_strides, *s_inter.stride(), *route_args), up_tile, hidden,
            CLAMP=swiglu_limit is not None, SHARED=IS > 0, **route_meta)
    _launch(_down_kernel, (T, cdiv(H, down_tile.block_n)),
            (inter, topk_index, topk_weights, down, out, s_inter, s_down, H, I, E, k, IS, *inter.stride(),
             *topk_index.stride(), *topk_weights.stride(), *down.stride(), *out.stride(), *s_inter.stride(),
             *(s_down.stride() if shared is not None else (0, 0))), down_tile, hidden, SHARED=IS > 0)
    return out


def _check_route(hidden: torch.Tensor, route: Route, E: int) -> None:
    logits = route.logits
    if logits.dim() != 2 or logits.shape[0] != hidden.shape[0] or not logits.dtype.is_floating_point:
        raise ValueError(f"moe_experts: the router logits must be a float [T={hidden.shape[0]}, E] tensor, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if logits.shape[1] != E:
        raise ValueError(f"moe_experts: the router scores {logits.shape[1]} experts, gate_up holds {E}")
    why = check_route_config(E, route.top_k, route.n_group, route.topk_group)
    if why:
        raise ValueError(f"moe_experts: route: {why}")


def _route_outputs(hidden: torch.Tensor, route: Route, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (topk_index int64 [T, k], topk_weights fp32 [T, k]) for the gate/up kernel to fill."""
    _check_route(hidden, route, E)
    T = hidden.shape[0]
    return (new_output((T, route.top_k), torch.int64, hidden.device),
            new_output((T, route.top_k), torch.float32, hidden.device))


def _route_launch(route: Route | None, topk_weights: torch.Tensor, E: int) -> tuple[tuple, dict]:
    """The gate/up kernel's routing arguments and constexprs (placeholders without a route)."""
    if route is None:
        return (topk_weights, topk_weights, topk_weights, 0.0, 0, 0, 0, 0), {}
    bias = route.bias if route.bias is not None else route.logits
    args = (route.logits, bias, topk_weights, float(route.scale), *route.logits.stride(), *topk_weights.stride())
    meta = dict(ROUTE=True, E_PAD=max(next_pow2(E), route.n_group), GROUPS=route.n_group,
                TOPK_GROUP=route.topk_group, ROUTE_TOPK=route.top_k, K_PAD=next_pow2(route.top_k),
                HAS_BIAS=route.bias is not None, RENORMALIZE=bool(route.renormalize))
    return args, meta


def moe_experts(
    hidden: torch.Tensor, topk_index: torch.Tensor, topk_weights: torch.Tensor, gate_up: torch.Tensor,
    down: torch.Tensor, use_triton: bool | None = None, swiglu_limit: float | None = None,
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Routed experts: hidden [T,H], topk_index [T,k] (outside [0, E): none), topk_weights [T,k],
    gate_up [E,2I,H], down [E,H,I] -> [T,H] (see the module docstring); swiglu_limit L: gate capped
    at L, up clamped to [-L, L] before silu(gate) * up (DeepSeek-V4; the shared expert's too); shared:
    (gate [IS,H], up [IS,H], down [H,IS]), a shared expert's SwiGLU MLP added to every token, in the
    same two launches.
    use_triton: see indexer_topk."""
    if use_triton_for(hidden, use_triton):
        return moe_experts_triton(hidden, topk_index, topk_weights, gate_up, down, swiglu_limit=swiglu_limit,
                                  shared=shared)
    _check_shared(hidden, shared)
    return moe_experts_ref(hidden, topk_index, topk_weights, gate_up, down, swiglu_limit, shared)


def moe_route_experts(
    hidden: torch.Tensor, route: Route, gate_up: torch.Tensor, down: torch.Tensor, use_triton: bool | None = None,
    swiglu_limit: float | None = None, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """moe_experts of the routing moe_route(route's logits and settings) gives (kernels/moe_router.py),
    the routing done in the experts' first launch -> [T,H]."""
    if use_triton_for(hidden, use_triton):
        return moe_experts_triton(hidden, None, None, gate_up, down, swiglu_limit=swiglu_limit, shared=shared,
                                  route=route)
    _check_route(hidden, route, gate_up.shape[0])
    weights, ids = moe_route_ref(*route)
    _check_shared(hidden, shared)
    return moe_experts_ref(hidden, ids, weights, gate_up, down, swiglu_limit, shared)


__all__ = ["moe_experts", "moe_route_experts", "moe_experts_triton", "Route", "default_tiles", "Tile", "HAS_TRITON"]
