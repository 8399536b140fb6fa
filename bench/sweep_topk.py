"""Indexer selection knobs on the H200: query-chunk height, and torch.topk sorted vs unsorted.

  * per L and chunk height: indexer scores alone and scores + top-k (ms) through
    indexer_topk_triton(chunk_rows=...), so the default (kernels/indexer_topk.py,
    CAUSAL_CHUNK_ROWS) can be chosen from measurements;
  * on the widest (last) chunk's real score buffer: torch.topk(sorted=True) (what the op returns:
    descending order) vs sorted=False (what a consumer that ignores order would need).

    python bench/sweep_topk.py   # -> bench/results/sweep_topk.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from ic_compile.kernels.indexer_topk import chunked_scores, indexer_topk_triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import bench_ms, indexer_inputs  # noqa: E402  (bench/kernel_speed.py)

CHUNKS = {16384: (512, 1024, 2048, 4096, 16384), 131072: (1024, 2048)}


def sweep(L: int, topk: int, device) -> list[dict]:
    q, k, w = indexer_inputs(1, L, L, 32, 128, device)
    rows = []
    for chunk in CHUNKS.get(L, (2048,)):
        def scores_only(chunk=chunk):
            for _ in chunked_scores(q, k, w, chunk_rows=chunk):
                pass

        ms_scores = bench_ms(scores_only, device, quick=True)
        ms_total = bench_ms(lambda: indexer_topk_triton(q, k, w, topk, chunk_rows=chunk), device, quick=True)
        rows.append({"L": L, "chunk_rows": chunk, "ms_scores": ms_scores, "ms_total": ms_total,
                     "ms_selection": ms_total - ms_scores})
        print(json.dumps(rows[-1]), flush=True)
    for _, _, last in chunked_scores(q, k, w):
        pass
    for sort in (True, False):
        ms = bench_ms(lambda: torch.topk(last, topk, dim=-1, sorted=sort), device, quick=True)
        rows.append({"L": L, "last_chunk": list(last.shape), "topk_sorted": sort, "ms": ms})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,131072")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sweep_topk.json"),
        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "results": []}
    for L in (int(x) for x in args.lengths.split(",")):
        report["results"] += sweep(L, 2048, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
