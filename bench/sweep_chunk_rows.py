"""Whole indexer + top-k (unordered) on the H200 by query-chunk height (chunk_rows).

    python bench/sweep_chunk_rows.py > bench/results/chunk_rows_h200.jsonl

Per L (prefill S = T = L, 30B indexer shape, top-k 2048): the default chunking (the 1 GiB score
buffer budget, causal chunks capped at CAUSAL_CHUNK_ROWS = 4096 rows) vs taller / shorter chunks,
two timings each, and rows whose selected set differs from the default's. JSON lines on stdout.
"""
import json
import sys

import torch

from ic_compile.kernels.indexer_topk import indexer_topk_triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernels import bench_ms, indexer_inputs, measure_peaks  # noqa: E402  (bench/kernels.py)

SWEEP = ((16384, (None, 2048, 8192, 16384)), (32768, (None, 8192)), (8192, (None, 8192)))


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(json.dumps(measure_peaks(device, smoke=False, quick=True)))
    for L, chunks in SWEEP:
        q, k, w = indexer_inputs(1, L, L, 32, 128, device)
        want = indexer_topk_triton(q, k, w, 2048, sorted=False)[0].sort(-1).values
        for rows in chunks:
            for rep in range(2):
                ms = bench_ms(lambda: indexer_topk_triton(q, k, w, 2048, sorted=False, chunk_rows=rows), device,
                              quick=True)
                print(json.dumps({"L": L, "chunk_rows": rows or "default", "rep": rep, "ms": round(ms, 4)}), flush=True)
            got = indexer_topk_triton(q, k, w, 2048, sorted=False, chunk_rows=rows)[0].sort(-1).values
            print(json.dumps({"L": L, "chunk_rows": rows, "mismatch_rows": int((got != want).any(-1).sum())}), flush=True)


if __name__ == "__main__":
    main()
