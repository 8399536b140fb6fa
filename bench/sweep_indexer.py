"""Time launch configs of the indexer score kernel (no autotune) at one length, both row orders.

    python bench/sweep_indexer.py --length 32768 --out sweep.json

FLOPs = L^2/2 * H * D * 2 (causal dot products); one query chunk of all L rows (scores buffer fp32).
"""
import argparse
import json

import torch
import triton
import triton.testing

from ic_compile.kernels.indexer_topk import indexer_scores

H, D = 32, 128


def candidates():
    for rows, warps in ((128, 4), (128, 8), (256, 8)):
        for block_t in (64, 128):
            for stages in (2, 3):
                for head_major in (False, True):
                    yield triton.Config({"BLOCK_S": rows // H, "BLOCK_T": block_t, "HEAD_MAJOR": head_major},
                                        num_warps=warps, num_stages=stages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=8192, help="query rows timed (the last ones: full width)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    L, n = args.length, args.rows
    q = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, L, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1, L, H, device="cuda")
    out = torch.empty(1, n, L, device="cuda")
    flops = sum(L - n + i + 1 for i in range(n)) * H * D * 2
    rows = []
    for cfg in candidates():
        fn = lambda: indexer_scores(q, k, w, None, True, L - n, n, L, out, config=cfg)  # noqa: E731
        try:
            fn()
            ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
            rows.append({**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages, "ms": ms,
                         "tflops": flops / ms / 1e9})
        except Exception as exc:  # out of resources
            rows.append({**cfg.kwargs, "warps": cfg.num_warps, "stages": cfg.num_stages, "error": type(exc).__name__})
    for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"]):
        print(json.dumps(r), flush=True)
    if args.out:
        open(args.out, "w").write(json.dumps({"length": L, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
