"""Time launch configs of the indexer score kernel (no autotune) at one length: dot rows =
queries x heads in both orders, and dot rows = keys (KEY_ROWS). Each config's scores are
checked against the first config's.

    python bench/sweep_indexer.py --length 32768 --out sweep.json
    python bench/sweep_indexer.py --key-rows-only

FLOPs = L^2/2 * H * D * 2 (causal dot products); one query chunk of all L rows (scores buffer fp32).
"""
import argparse
import json
import pathlib

import torch
import triton
import triton.testing

from ic_compile.kernels.indexer_topk import indexer_scores

H, D = 32, 128


def candidates(key_rows_only: bool):
    yield triton.Config({"BLOCK_S": 128 // H, "BLOCK_T": 64, "HEAD_MAJOR": True}, num_warps=4, num_stages=3)
    for rows, warps in (() if key_rows_only else ((128, 4), (128, 8), (256, 8))):
        for block_t in (64, 128):
            for stages in (2, 3):
                for head_major in (False, True):
                    yield triton.Config({"BLOCK_S": rows // H, "BLOCK_T": block_t, "HEAD_MAJOR": head_major},
                                        num_warps=warps, num_stages=stages)
    # keys as dot rows; (queries x heads, key block, warps) without register spills in AOT sm_90 compiles
    for rows, block_t, warps in ((128, 64, 4), (128, 64, 8), (128, 128, 4), (128, 128, 8), (128, 256, 8),
                                 (256, 64, 4), (256, 64, 8), (256, 128, 8)):
        for stages in (2, 3):
            yield triton.Config({"BLOCK_S": rows // H, "BLOCK_T": block_t, "HEAD_MAJOR": False, "KEY_ROWS": True},
                                num_warps=warps, num_stages=stages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=8192, help="query rows timed (the last ones: full width)")
    ap.add_argument("--key-rows-only", action="store_true", help="KEY_ROWS configs (+ one reference config)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sweep_indexer.json"),
        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args()
    L, n = args.length, args.rows
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1, L, H, device="cuda")
    out = torch.empty(1, n, L, device="cuda")
    flops = sum(L - n + i + 1 for i in range(n)) * H * D * 2
    rows, first = [], None
    for cfg in candidates(args.key_rows_only):
        fn = lambda: indexer_scores(q, k, w, None, True, L - n, n, L, out, config=cfg)  # noqa: E731
        try:
            fn()
            if first is None:
                first = out.clone()
            finite = torch.isfinite(first)
            same_mask = bool((torch.isfinite(out) == finite).all())
            diff = (out[finite] - first[finite]).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
            rows.append({**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages, "ms": ms,
                         "tflops": flops / ms / 1e9, "max_abs_diff_vs_first": diff, "same_neg_inf": same_mask})
        except Exception as exc:  # out of resources
            rows.append({**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages, "error": type(exc).__name__})
    for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"]):
        print(json.dumps(r), flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps({"length": L, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
