"""Long-context indexer on one GPU (the paper's setting, up to 256K): bf16 vs fp8, key splits, selection.

Per L (prefill, S = T = L, 30B indexer shape 32 x 128, top-k 2048, B = 1):
  * scores alone and scores + unordered top-k (what the lowering runs), % of the in-run bf16 peak
    (FLOPs = L^2/2 * H * D * 2, the same count for fp8);
  * --splits-ab L: also with one key split per program row (num_splits=1: the launch shape before
    prefill_splits) and, with --chunk-rows, taller query chunks;
  * --select L: topk_select alone on the last (widest) chunk's buffer: ms, paths, % of its read floor;
  * --exact L: the unordered selection's sets vs torch.topk's over the same scores (all rows);
  * --fp8 L: indexer_precision="fp8" timings, and its top-k recall against the bf16 selection
    (|fp8 set & bf16 set| / topk, rows sampled) on random and on structured inputs.

    python bench/sweep_long.py --lengths 32768,65536,131072,200000,262144   # -> bench/results/sweep_long.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

from ic_compile.kernels.indexer_topk import chunked_scores, indexer_topk_triton
from ic_compile.kernels.reference import topk_indices_from_scores
# the launch knobs are private to topk_select (_Tuning); bench sweeps build their own
from ic_compile.kernels.topk_select import _topk_select_with_path, _Tuning, row_lengths, topk_select

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import bench_ms, indexer_inputs, measure_peaks  # noqa: E402  (bench/kernel_speed.py)

H, D, TOPK = 32, 128, 2048
REPORT: dict = {}


def emit(entry: dict, out: str | None) -> None:
    REPORT.setdefault("results", []).append(entry)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(REPORT, f, indent=1)


def flops(L: int) -> float:
    return L * L / 2 * H * D * 2


def time_indexer(q, k, w, peak, label: dict, out, **kw) -> dict:
    def scores_only():
        for _ in chunked_scores(q, k, w, chunk_rows=kw.get("chunk_rows"), num_splits=kw.get("num_splits"),
                                indexer_precision=kw.get("indexer_precision", "bf16")):
            pass

    L = q.shape[1]
    t0 = time.time()
    ms_s = bench_ms(scores_only, q.device, quick=True)
    ms_t = bench_ms(lambda: indexer_topk_triton(q, k, w, TOPK, sorted=False, **kw), q.device, quick=True)
    entry = {**label, "L": L, **{k2: v for k2, v in kw.items()}, "ms_scores": ms_s, "ms_total_unordered": ms_t,
             "ms_selection": ms_t - ms_s, "pct_peak_scores": 100 * flops(L) / ms_s / 1e9 / peak,
             "pct_peak_total_unordered": 100 * flops(L) / ms_t / 1e9 / peak, "wall_s": time.time() - t0}
    emit(entry, out)
    return entry


def set_mismatches(a, b) -> int:
    return int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())


def recall(got: torch.Tensor, want: torch.Tensor, T: int) -> float:
    """Mean over rows of |got & want| / |want| (-1 entries ignored); got, want [R, K]."""
    hits, total = 0, 0
    for r0 in range(0, got.shape[0], 512):
        g, wt = got[r0:r0 + 512].long(), want[r0:r0 + 512].long()
        member = torch.zeros(g.shape[0], T + 1, dtype=torch.bool, device=g.device)
        member.scatter_(1, torch.where(g >= 0, g, T), True)
        member[:, T] = False
        valid = wt >= 0
        hits += int((member.gather(1, torch.where(valid, wt, T)) & valid).sum())
        total += int(valid.sum())
    return hits / max(total, 1)


def structured_inputs(L: int, device, kind: str):
    """Scores with clear winners: 'outliers' -- a few key channels 20x larger (massive activations)
    and queries near some keys; 'lowrank' -- q and k from a shared 16-dim subspace plus noise."""
    g = torch.Generator(device=device).manual_seed(1)
    if kind == "outliers":
        k = torch.randn(1, L, D, device=device, generator=g)
        k[..., :4] *= 20
        src = torch.randint(0, L, (L,), device=device, generator=g)
        q = 0.5 * k[0, src][None, :, None, :] / 20 + torch.randn(1, L, H, D, device=device, generator=g)
    else:
        basis = torch.randn(16, D, device=device, generator=g)
        k = torch.randn(1, L, 16, device=device, generator=g) @ basis + 0.3 * torch.randn(1, L, D, device=device,
                                                                                             generator=g)
        q = torch.randn(1, L, H, 16, device=device, generator=g) @ basis + 0.3 * torch.randn(1, L, H, D,
                                                                                               device=device,
                                                                                               generator=g)
    w = torch.rand(1, L, H, device=device, generator=g) / H**0.5
    return q.bfloat16(), k.bfloat16(), w


def fp8_recall(q, k, w, rows: int) -> dict:
    """Recall of the fp8 selection vs bf16 on `rows` query rows spread over the sequence."""
    L = q.shape[1]
    pick = torch.linspace(TOPK, L - 1, rows, device=q.device).long()  # rows with >= topk keys
    qs, ws = q[:, pick], w[:, pick]
    # the picked rows as queries at their own positions: a non-causal call with a per-row key range
    rng = torch.stack([torch.zeros_like(pick), pick, pick + 1], -1)[None].to(torch.int32)
    bf = indexer_topk_triton(qs, k, ws, TOPK, causal=False, sorted=False, key_range=rng)
    f8 = indexer_topk_triton(qs, k, ws, TOPK, causal=False, sorted=False, key_range=rng, indexer_precision="fp8")
    return {"recall_fp8_vs_bf16": recall(f8[0], bf[0], L), "rows": rows}


SELECT_VARIANTS = {"4 warps, block 1024, 3 stages, 72 regs": dict(num_warps=4, block=1024, stages=3, maxnreg=72),
                   "8 warps, block 2048, 72 regs": dict(num_warps=8, block=2048, stages=3, maxnreg=72),
                   "8 warps, block 2048": dict(num_warps=8, block=2048, stages=3),
                   "8 warps, block 1024, 72 regs": dict(num_warps=8, block=1024, stages=3, maxnreg=72)}
# whole-indexer A/B of indexer_topk._SELECT_TUNING_LONG (chunks wider than LONG_ROW)
LONG_VARIANTS = {"long rows: 4 warps, block 1024, 72 regs": dict(num_warps=4, block=1024, stages=3, maxnreg=72,
                                                                 resolve_warps=8),
                 "long rows: 8 warps, block 2048": dict(num_warps=8, block=2048, stages=3, maxnreg=None,
                                                        resolve_warps=8)}


def select_shape(R: int, W: int, peaks: dict, out) -> None:
    """topk_select on a random [R, W] fp32 buffer (full rows): the read floor (a row max, one pass)
    and each launch variant, in GB/s of the buffer read once."""
    scores = torch.randn(R, W, device="cuda")
    gb = R * W * 4 / 1e9
    ms_max = bench_ms(lambda: scores.amax(-1), scores.device, quick=True)
    entry = {"select_shape": [R, W], "gb": gb, "amax_ms": ms_max, "amax_gbps": gb / ms_max * 1e3}
    want = topk_indices_from_scores(scores, TOPK)
    for name, kw in SELECT_VARIANTS.items():
        ms = bench_ms(lambda: topk_select(scores, TOPK, sorted=False, _tuning=_Tuning(**kw)), scores.device,
                      quick=True)
        got, path = _topk_select_with_path(scores, TOPK, sorted=False, tuning=_Tuning(**kw))
        entry[name] = {"ms": ms, "gbps": gb / ms * 1e3, "paths": torch.bincount(path.long(), minlength=4).tolist(),
                       "set_mismatch_rows": set_mismatches(got, want)}
    # the resolve kernel alone (rows that fit CAND): R x 4096 buffer
    small = scores[:, :4096].contiguous()
    entry["resolve_only_ms"] = bench_ms(lambda: topk_select(small, TOPK, sorted=False, _tuning=_Tuning(resolve_warps=8)),
                                        scores.device, quick=True)
    emit(entry, out)
    del scores, small
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="131072,200000")
    ap.add_argument("--splits-ab", default="", help="lengths also timed with num_splits=1")
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[], help="with --splits-ab: also these heights")
    ap.add_argument("--select", default="", help="lengths: topk_select alone on the last chunk")
    ap.add_argument("--exact", default="", help="lengths: unordered sets vs torch.topk's (all rows)")
    ap.add_argument("--fp8", default="", help="lengths: fp8 timings and recall vs bf16")
    ap.add_argument("--recall-rows", type=int, default=2048)
    ap.add_argument("--select-shapes", default="", help="ROWSxWIDTH,...: topk_select on random full rows")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "sweep_long.json"),
        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    device = torch.device("cuda")
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=False, quick=True)
    REPORT.update(device=torch.cuda.get_device_name(device), torch=torch.__version__, peaks=peaks,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), args=vars(args))
    print(json.dumps(peaks), flush=True)
    peak = peaks["bf16_matmul_tflops"]
    for L in ints(args.lengths):
        q, k, w = indexer_inputs(1, L, L, H, D, device)
        time_indexer(q, k, w, peak, {"variant": "bf16"}, args.out)
        if L in ints(args.splits_ab):
            time_indexer(q, k, w, peak, {"variant": "bf16, one key split"}, args.out, num_splits=1)
            from ic_compile.kernels import indexer_topk as mod
            default = mod._SELECT_TUNING_LONG
            for name, kw in LONG_VARIANTS.items():
                mod._SELECT_TUNING_LONG = _Tuning(**kw)
                try:
                    time_indexer(q, k, w, peak, {"variant": f"bf16, {name}"}, args.out)
                finally:
                    mod._SELECT_TUNING_LONG = default
            for r in args.chunk_rows:
                time_indexer(q, k, w, peak, {"variant": f"bf16, {r}-row chunks"}, args.out, chunk_rows=r)
        if L in ints(args.fp8):
            time_indexer(q, k, w, peak, {"variant": "fp8"}, args.out, indexer_precision="fp8")
            emit({"L": L, "inputs": "random", **fp8_recall(q, k, w, args.recall_rows)}, args.out)
        if L in ints(args.select):
            for s0, _, last in chunked_scores(q, k, w):
                pass
            R, W = last.shape[1:]
            read = int(row_lengths(R, W, s0, device=device).sum()) * 4
            tuning = _Tuning(num_warps=4, block=1024, stages=3, maxnreg=72, resolve_warps=8)
            ms = bench_ms(lambda: topk_select(last[0], TOPK, diag_base=s0, sorted=False, _tuning=tuning), device,
                          quick=True)
            _, path = _topk_select_with_path(last[0], TOPK, diag_base=s0, sorted=False, tuning=tuning)
            emit({"L": L, "last_chunk": [R, W], "select_ms": ms, "read_gb": read / 1e9,
                  "pct_copy_bw": 100 * read / ms / 1e6 / (peaks["copy_gbps"] / 2),
                  "paths": torch.bincount(path.long(), minlength=4).tolist()}, args.out)
        if L in ints(args.exact):
            got = indexer_topk_triton(q, k, w, TOPK, sorted=False)
            want = indexer_topk_triton(q, k, w, TOPK, selection="torch")
            emit({"L": L, "exact_rows_mismatching_torch_topk": set_mismatches(got[0], want[0])}, args.out)
        del q, k, w
        torch.cuda.empty_cache()
    for shape in (x for x in args.select_shapes.split(",") if x):
        select_shape(*map(int, shape.split("x")), peaks, args.out)
    tuned = {}
    from ic_compile.kernels import indexer_topk as mod
    for key, kernel in mod._TUNED.items():
        if hasattr(kernel, "cache"):
            tuned[str(key)] = {str(k): str(v) for k, v in kernel.cache.items()}
    emit({"autotuned": tuned}, args.out)
    for L in ints(args.fp8):
        for kind in ("outliers", "lowrank"):
            q, k, w = structured_inputs(L, device, kind)
            emit({"L": L, "inputs": kind, **fp8_recall(q, k, w, args.recall_rows)}, args.out)
            del q, k, w
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
