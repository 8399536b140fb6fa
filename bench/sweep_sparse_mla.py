"""Time every launch config of the sparse-MLA kernel (no autotune) at one length, per head count.

    python bench/sweep_sparse_mla.py --length 16384 --heads 20 64 --out sweep.json
    python bench/sweep_sparse_mla.py --heads 20 --block-h 32 --block-k 64 128 --warps 4 --stages 2 3
    python bench/sweep_sparse_mla.py --decode-splits 8 16 32 64 --length 200000 --heads 20 --out ''

Indices: the indexer's own top-k of random bf16 q/k (as in a model), not a synthetic stride.
Prints ms and TFLOP/s (FLOPs = L*k*H*(576+512)*2) per config, best first.
--decode-splits: one query at position L (decode, B = 1) instead, latent and rope in two cache buffers
as the lowering passes them, per config x split count, replayed from a CUDA graph (what a served
decode step pays; no launch cost), against the time to read the selected rows once at copy bandwidth.
"""
import argparse
import json
import pathlib

import torch
import triton
import triton.testing

from ic_compile.kernels.indexer_topk import indexer_topk
from ic_compile.kernels.reference import sparse_mla_ref
from ic_compile.kernels.sparse_attention import sparse_mla_triton

DQK, DV, TOPK = 576, 512, 2048


def candidates(args):
    for block_h in args.block_h:
        for block_k in args.block_k:
            for warps in args.warps:
                for stages in args.stages:
                    yield triton.Config({"BLOCK_H": block_h, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


def model_indices(L, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, L, 32, 128, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, L, 128, device=device, dtype=torch.bfloat16, generator=g)
    w = torch.rand(1, L, 32, device=device, generator=g)
    return indexer_topk(q, k, w, TOPK)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, nargs="+", default=[20, 64])
    ap.add_argument("--block-h", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--block-k", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--decode-splits", type=int, nargs="*", default=[],
                    help="sweep decode (one query) with these num_splits instead of prefill")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sweep_sparse_mla.json"),
        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args()
    if args.decode_splits:
        return decode_sweep(args)
    L, device = args.length, torch.device("cuda")
    idx = model_indices(L, device)
    kv = torch.randn(1, L, DQK, device=device, dtype=torch.bfloat16)
    rows = []
    for H in args.heads:
        q = torch.randn(1, L, H, DQK, device=device, dtype=torch.bfloat16)
        flops = float((idx >= 0).sum()) * H * (DQK + DV) * 2
        want = sparse_mla_ref(q[:, -256:], kv, idx[:, -256:], DQK ** -0.5, DV)  # the last 256 queries
        for cfg in candidates(args):
            if cfg.kwargs["BLOCK_H"] < min(64, triton.next_power_of_2(H)) // 2:
                continue
            try:
                fn = lambda: sparse_mla_triton(q, kv, idx, DQK ** -0.5, DV, config=cfg)  # noqa: E731
                err = (fn()[:, -256:].float() - want.float()).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
                row = {"H": H, **cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages,
                       "ms": ms, "tflops": flops / ms / 1e9, "max_abs_diff_vs_ref": err}
            except Exception as exc:  # out of shared memory / registers: skip
                row = {"H": H, **cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages,
                       "error": type(exc).__name__}
            rows.append(row)
        best = sorted((r for r in rows if r["H"] == H and "ms" in r), key=lambda r: r["ms"])[:8]
        print(json.dumps(best, indent=None), flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps({"length": L, "rows": rows}, indent=1))


def decode_sweep(args):
    """Decode: q [1,1,H,Dl] + q_rope, the latent [1,T,Dl] and rope [1,T,Dr] of a cache, 2048 indices."""
    L, device = args.length, torch.device("cuda")
    latent = torch.randn(1, 1, L + 64, DV, device=device, dtype=torch.bfloat16)[:, 0, :L]  # cache views
    rope = torch.randn(1, 1, L + 64, DQK - DV, device=device, dtype=torch.bfloat16)[:, 0, :L]
    idx = model_indices(L, device)[:, -1:]  # [1,1,2048]: the last query's selection
    rows = []
    for H in args.heads:
        q = torch.randn(1, 1, H, DQK, device=device, dtype=torch.bfloat16)
        want = sparse_mla_ref(q, torch.cat((latent, rope), -1), idx, DQK ** -0.5, DV)
        floor_ms = TOPK * DQK * 2 / 3.0e12 * 1e3  # the selected rows once at ~3 TB/s
        for cfg in candidates(args):
            for splits in args.decode_splits:
                row = {"H": H, **cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages, "splits": splits}
                try:
                    fn = lambda: sparse_mla_triton(q[..., :DV], latent, idx, DQK ** -0.5, DV,  # noqa: E731
                                                   num_splits=splits, config=cfg, rope=rope, q_rope=q[..., DV:])
                    row["max_abs_diff_vs_ref"] = (fn().float() - want.float()).abs().max().item()
                    row["graph_us"] = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
                    row["floor_us"] = 1e3 * floor_ms
                except Exception as exc:  # out of shared memory / registers: skip
                    row["error"] = type(exc).__name__
                rows.append(row)
        best = sorted((r for r in rows if r["H"] == H and "graph_us" in r), key=lambda r: r["graph_us"])[:8]
        print(json.dumps(best, indent=None), flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps({"length": L, "decode": True, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
