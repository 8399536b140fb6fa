"""Sparse MLA prefill: heads-as-rows kernel (sparse_attention.py, its best sweep config) vs the
keys-as-rows kernel (sparse_mla_keys_major.py, each of its configs), same inputs, one run.

    python bench/compare_sparse_mla.py --lengths 16384 131072 --heads 20 32 --out cmp.json

Indices: the indexer's own top-k of random bf16 q/k (bench/sweep_sparse_mla.py). Prints ms,
TFLOP/s (FLOPs = valid picks * H * (576+512) * 2) and the max |difference| of the two outputs.
"""
import argparse
import json
import sys

import torch
import triton
import triton.testing

from ic_compile.kernels.sparse_attention import sparse_mla_triton
from ic_compile.kernels.sparse_mla_keys_major import _configs, sparse_mla_keys_major

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from sweep_sparse_mla import DQK, DV, model_indices  # noqa: E402

HEADS_AS_ROWS_BEST = triton.Config({"BLOCK_H": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2)  # H=20, 16K sweep


def compare(L, H, idx, kv, device):
    q = torch.randn(1, L, H, DQK, device=device, dtype=torch.bfloat16)
    flops = float((idx >= 0).sum()) * H * (DQK + DV) * 2
    runs = [("heads_as_rows", HEADS_AS_ROWS_BEST,
             lambda: sparse_mla_triton(q, kv, idx, DQK ** -0.5, DV, config=HEADS_AS_ROWS_BEST))]
    runs += [("keys_as_rows", cfg, lambda cfg=cfg: sparse_mla_keys_major(q, kv, idx, DQK ** -0.5, DV, config=cfg))
             for cfg in _configs(H)]
    baseline = runs[0][2]()
    rows = []
    for name, cfg, fn in runs:
        row = {"L": L, "H": H, "kernel": name, **cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages}
        try:
            out = fn()
            ms = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
            row.update(ms=ms, tflops=flops / ms / 1e9, max_abs_diff=float((out.float() - baseline.float()).abs().max()))
        except Exception as exc:  # out of shared memory / registers
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072])
    ap.add_argument("--heads", type=int, nargs="+", default=[20, 32])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for L in args.lengths:
        idx = model_indices(L, device)
        kv = torch.randn(1, L, DQK, device=device, dtype=torch.bfloat16)
        for H in args.heads:
            rows += compare(L, H, idx, kv, device)
        del idx, kv
        torch.cuda.empty_cache()
    if args.out:
        open(args.out, "w").write(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
