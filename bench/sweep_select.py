"""Top-k selection on the H200: kernels/topk_select.py vs torch.topk, on real indexer scores.

Per L (prefill, S = T = L, 30B indexer shape, top-k 2048):
  * on the widest (last) query chunk's score buffer: torch.topk (descending) vs topk_select
    for each launch config (filter kernel: num_warps, block, stages, maxnreg; resolve_warps) --
    ms, how many rows took each path (direct / filtered / retried / exact), rows whose selected
    SET differs from torch.topk's, and % of the copy bandwidth for reading each row once up to
    its diagonal (the selection's byte floor);
  * the whole indexer (scores + selection over all chunks) with selection="torch" vs "triton"
    (a few topk_select launch configs; --chunk-rows: other query-chunk heights), each unordered
    variant's selected sets checked against torch.topk's;
Decode (S = 1, T = 128K, B in {1, 16}): torch.topk vs topk_select on the [B, 1, T] buffer, by
programs per row in the filtering step (segments; 1 = the one-program filter).

    python bench/sweep_select.py   # -> bench/results/sweep_select.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from ic_compile.kernels import indexer_topk
from ic_compile.kernels.indexer_topk import chunked_scores, indexer_topk_triton
from ic_compile.kernels.reference import topk_indices_from_scores
import dataclasses

# the launch knobs are private to topk_select (_Tuning); bench sweeps build their own
from ic_compile.kernels.topk_select import _topk_select_with_path, _Tuning, row_lengths

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import bench_ms, indexer_inputs, measure_peaks  # noqa: E402  (bench/kernel_speed.py)

TOPK = 2048
# launch configs (unordered; topk_select's private _Tuning fields): filter (num_warps, block, stages, maxnreg),
# resolve_warps
CONFIGS = [dict(num_warps=warps, block=block, stages=stages, maxnreg=maxnreg, resolve_warps=resolve)
           for warps, block, stages, maxnreg, resolve in ((4, 1024, 3, 72, 8), (4, 1024, 3, 72, 4))]
# (resolve_warps 2 / 1: 1.4x / 2.2x slower on a 16K chunk, H200: the resolve is instruction-bound, and fewer
# warps per row issue the same per-candidate work with less parallelism)
# decode (few wide rows): programs per row in the filtering step (1 = the one-program filter)
DECODE_CONFIGS = [dict(num_warps=warps, block=1024, stages=3, segments=segments)
                  for segments in (1, 8, 16, 32, 64, 128) for warps in (4, 8)]
WHOLE_INDEXER = {"torch.topk (descending)": dict(selection="torch"),
                 "auto, unordered (topk_select)": dict(sorted=False)}
# whole-indexer runs with indexer_topk._SELECT_TUNING changed (name -> overrides)
WHOLE_INDEXER_SELECT = {"auto, unordered (topk_select), resolve_warps=4": dict(resolve_warps=4)}


def set_mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Rows of [R, K] whose index sets differ."""
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


def compare_on_buffer(scores: torch.Tensor, diag_base: int | None, copy_gbps: float, label: dict,
                      configs: list[dict] = CONFIGS, graphs: bool = False) -> list[dict]:
    """scores [R, W] (one query chunk): torch.topk vs every topk_select config; `graphs`: also
    timed as CUDA-graph replays (graph_ms: no host launch overhead, as decode runs in serving)."""
    R, W = scores.shape
    read_bytes = int(row_lengths(R, W, diag_base, device=scores.device).sum()) * 4
    floor_ms = read_bytes / copy_gbps / 1e6 * 2  # copy_gbps counts read + write
    want = topk_indices_from_scores(scores, TOPK)
    rows = [{**label, "rows": R, "width": W, "impl": "torch.topk", "read_floor_ms": floor_ms,
             "ms": bench_ms(lambda: topk_indices_from_scores(scores, TOPK), scores.device, quick=True)}]
    if graphs:
        rows[-1]["graph_ms"] = graph_ms(lambda: topk_indices_from_scores(scores, TOPK))
    print(json.dumps(rows[-1]), flush=True)
    for cfg in configs:
        def run(cfg=cfg):
            return _topk_select_with_path(scores, TOPK, diag_base=diag_base, sorted=False, tuning=_Tuning(**cfg))
        got, path = run()
        entry = {**label, "impl": "topk_select", "sorted": False, **cfg,
                 "ms": bench_ms(run, scores.device, quick=True), **({"graph_ms": graph_ms(run)} if graphs else {}),
                 "paths": torch.bincount(path.long(), minlength=4).tolist(),
                 "set_mismatch_rows": set_mismatches(got, want)}
        entry["pct_of_read_floor"] = 100 * floor_ms / entry["ms"]
        rows.append(entry)
        print(json.dumps(entry), flush=True)
    return rows


def graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (triton.testing.do_bench_cudagraph)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def prefill(L: int, device, copy_gbps: float, chunk_rows: list[int] = ()) -> list[dict]:
    q, k, w = indexer_inputs(1, L, L, 32, 128, device)
    rows = []
    taller = {f"auto, unordered, chunk_rows={r}": dict(sorted=False, chunk_rows=r) for r in chunk_rows}
    for name, kwargs in {**WHOLE_INDEXER, **taller}.items():
        ms = bench_ms(lambda: indexer_topk_triton(q, k, w, TOPK, **kwargs), device, quick=True)
        rows.append({"L": L, "indexer_total_ms": ms, "selection": name,
                     "select_kwargs": dataclasses.asdict(indexer_topk._SELECT_TUNING)})
        print(json.dumps(rows[-1]), flush=True)
    for name, overrides in WHOLE_INDEXER_SELECT.items():
        default = indexer_topk._SELECT_TUNING
        indexer_topk._SELECT_TUNING = dataclasses.replace(default, **overrides)
        try:
            ms = bench_ms(lambda: indexer_topk_triton(q, k, w, TOPK, sorted=False), device, quick=True)
        finally:
            indexer_topk._SELECT_TUNING = default
        rows.append({"L": L, "indexer_total_ms": ms, "selection": name,
                     "select_kwargs": dataclasses.asdict(dataclasses.replace(default, **overrides))})
        print(json.dumps(rows[-1]), flush=True)
    want = indexer_topk_triton(q, k, w, TOPK, selection="torch")
    for rows_per_chunk in (None, *chunk_rows):
        got = indexer_topk_triton(q, k, w, TOPK, sorted=False, chunk_rows=rows_per_chunk)
        rows.append({"L": L, "chunk_rows": rows_per_chunk or "default",
                     "whole_indexer_set_mismatch_rows": set_mismatches(got[0], want[0])})
        print(json.dumps(rows[-1]), flush=True)
    for s0, _, last in chunked_scores(q, k, w):
        pass
    rows += compare_on_buffer(last[0], s0, copy_gbps, {"L": L, "mode": "prefill_last_chunk"})
    return rows


def decode(B: int, T: int, device, copy_gbps: float) -> list[dict]:
    q, k, w = indexer_inputs(B, 1, T, 32, 128, device)
    for _, _, scores in chunked_scores(q, k, w):
        pass
    return compare_on_buffer(scores[:, 0], None, copy_gbps, {"B": B, "T": T, "mode": "decode"}, DECODE_CONFIGS,
                             graphs=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,131072")
    ap.add_argument("--decode", default="1,16", help="decode batch sizes at T=128K ('' = none)")
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[],
                    help="whole indexer also with these query-chunk heights (default: the 1 GiB budget, "
                         "causal chunks <= 4096 rows); taller chunks measured within noise at 128K, -3 %% at 16K "
                         "for 768 MiB more score buffer: not adopted")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sweep_select.json"),
        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=False, quick=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "peaks": peaks,
              "results": []}
    try:
        for L in (int(x) for x in args.lengths.split(",") if x):
            report["results"] += prefill(L, device, peaks["copy_gbps"], args.chunk_rows)
        for B in (int(x) for x in args.decode.split(",") if x):
            report["results"] += decode(B, 131072, device, peaks["copy_gbps"])
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
