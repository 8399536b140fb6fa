"""Benchmark of the ic-compile Triton kernels (meant for an H200; --smoke runs on CPU).

Measures, in one run:
  * the card's bf16 matmul peak (8192^3) and copy bandwidth (read + write bytes / s);
  * indexer prefill (S = T = L, causal) for the DSA indexer shapes: scores kernel alone and
    scores + top-k selection (descending rows, and unordered rows as the lowering asks for
    behind HF's index mask), TFLOP/s with FLOPs = L^2/2 * H * D * 2 (dot products only);
  * indexer decode (S = 1, T up to 128K, B in {1, 16}): bytes = K read once, as % of copy BW;
  * sparse MLA (absorbed 576 / v 512, H in {20, 64}, top-k 2048): FLOPs = L * k * H * (576+512) * 2;
    plus its decode form (S = 1) as % of copy BW (bytes = selected kv rows read once), and (GPU)
    the time of only reading the gathered rows (bench/gather_bandwidth.py) as its memory floor;
  * the causal-mask check ic::indexer_topk runs per F layer on the model's [L, L] bool mask
    (kernels/mask_within_causal.py, Triton vs its chunked torch reference): bytes = the upper
    triangle read once, as % of copy BW.

    python bench/kernel_speed.py                                    # full run (GPU) -> bench/results/kernels.json
    python bench/kernel_speed.py --quick --lengths 4096,16384       # faster subset
    python bench/kernel_speed.py --smoke                            # tiny sizes, runs on CPU too
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # bench/gather_bandwidth.py
from ic_compile.kernels.indexer_topk import chunked_scores, indexer_topk  # noqa: E402
from ic_compile.kernels.mask_within_causal import mask_within_causal  # noqa: E402
from ic_compile.kernels.sparse_attention import sparse_mla  # noqa: E402

# Indexer shapes (heads x head dim) per model; identical shapes are measured once.
INDEXER_MODELS = {"30B": (32, 128), "GLM-5": (32, 128)}
MLA_HEADS = (20, 64)
MLA_DQK, MLA_DV = 576, 512
TOPK = 2048
DEFAULT_LENGTHS = (4096, 16384, 65536, 131072)
DECODE_BATCHES = (1, 16)


# ----------------------------------------------------------------------------- timing

def bench_ms(fn, device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing

        fn()  # first call autotunes: keep it out of do_bench's runtime estimate
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200,
                                       return_mode="median")
    fn()  # warm-up (interpreter / allocations)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_peaks(device: torch.device, smoke: bool, quick: bool) -> dict:
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms_mm = bench_ms(lambda: a @ b, device, quick)
    nbytes = (64 if smoke else 2048) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms_copy = bench_ms(lambda: dst.copy_(src), device, quick)
    return {
        "matmul_n": n,
        "bf16_matmul_tflops": 2 * n**3 / ms_mm / 1e9,
        "copy_bytes": nbytes,
        "copy_gbps": 2 * nbytes / ms_copy / 1e6,  # read + write
    }


# ----------------------------------------------------------------------------- inputs

def indexer_inputs(B, S, T, H, D, device):
    q = torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, D, device=device, dtype=torch.bfloat16)
    w = torch.rand(B, S, H, device=device, dtype=torch.float32) / H**0.5
    return q, k, w


def strided_causal_indices(B, S, T, K, device) -> torch.Tensor:
    """[B,S,K] distinct causal indices spread over each query's history (-1 where s+1 < K)."""
    s_pos = torch.arange(S, device=device)[:, None] + (T - S)  # [S,1]
    stride = ((s_pos + 1) // K).clamp(min=1)
    offset = (torch.rand(S, 1, device=device) * stride).long()
    idx = s_pos - offset - torch.arange(K, device=device)[None, :] * stride  # [S,K]
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, -1))
    return idx.to(torch.int32)[None].expand(B, S, K).contiguous()


# ----------------------------------------------------------------------------- measurements

def time_indexer(q, k, w, topk, device, quick) -> tuple[float, float]:
    """(ms of the score kernel alone, ms of scores + top-k selection)."""
    def scores_only():
        for _ in chunked_scores(q, k, w):
            pass

    ms_scores = bench_ms(scores_only, device, quick)
    ms_total = bench_ms(lambda: indexer_topk(q, k, w, topk, use_triton=True), device, quick)
    return ms_scores, ms_total


def bench_indexer_prefill(L, H, D, topk, device, peaks, quick) -> dict:
    """Totals for descending rows (torch.topk) and for unordered rows (what the lowering asks
    for behind HF's index mask: kernels/topk_select.py)."""
    q, k, w = indexer_inputs(1, L, L, H, D, device)
    flops = L * L / 2 * H * D * 2
    ms_scores, ms_total = time_indexer(q, k, w, topk, device, quick)
    ms_unordered = bench_ms(lambda: indexer_topk(q, k, w, topk, use_triton=True, sorted=False), device, quick)
    times = {"scores": ms_scores, "total": ms_total, "total_unordered": ms_unordered}
    return {**{f"ms_{part}": ms for part, ms in times.items()},
            **rates(flops, times, 1e9, peaks["bf16_matmul_tflops"], "tflops", "pct_peak")}


def rates(work: float, times: dict, per_ms: float, ceiling: float, rate: str, pct: str) -> dict:
    """{rate_part: work / ms / per_ms, pct_part: that as % of ceiling} for each part's ms in `times`."""
    out = {}
    for part, ms in times.items():
        out[f"{rate}_{part}"] = work / ms / per_ms
        out[f"{pct}_{part}"] = 100 * out[f"{rate}_{part}"] / ceiling
    return out


def bench_mask_check(L, device, peaks, quick) -> dict:
    """Causal [1, L, L] bool mask (must pass the check): Triton kernel vs the torch reference."""
    rows = torch.arange(L, device=device)[:, None]
    mask = (torch.arange(L, device=device)[None, :] <= rows)[None]
    nbytes = L * (L - 1) // 2  # the upper triangle, read once
    ms = bench_ms(lambda: mask_within_causal(mask, L, L, use_triton=True), device, quick)
    ms_ref = bench_ms(lambda: mask_within_causal(mask, L, L, use_triton=False), device, quick)
    assert mask_within_causal(mask, L, L, use_triton=True)
    return {"bytes": nbytes, "ms": ms, "ms_torch_reference": ms_ref, "gbps": nbytes / ms / 1e6,
            "pct_copy_bw": 100 * nbytes / ms / 1e6 / peaks["copy_gbps"]}


def bench_indexer_decode(B, T, H, D, topk, device, peaks, quick) -> dict:
    q, k, w = indexer_inputs(B, 1, T, H, D, device)
    nbytes = k.numel() * k.element_size()  # K read once
    ms_scores, ms_total = time_indexer(q, k, w, topk, device, quick)
    times = {"scores": ms_scores, "total": ms_total}
    return {"bytes": nbytes, **{f"ms_{part}": ms for part, ms in times.items()},
            **rates(nbytes, times, 1e6, peaks["copy_gbps"], "gbps", "pct_copy_bw")}


def bench_sparse_mla_prefill(L, H, K, dqk, dv, device, peaks, quick) -> dict:
    q = torch.randn(1, L, H, dqk, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, L, dqk, device=device, dtype=torch.bfloat16)
    idx = strided_causal_indices(1, L, L, K, device)
    flops = L * K * H * (dqk + dv) * 2
    ms = bench_ms(lambda: sparse_mla(q, kv, idx, dqk**-0.5, dv, use_triton=True), device, quick)
    entry = {
        "ms": ms, "tflops": flops / ms / 1e9, "pct_peak": 100 * flops / ms / 1e9 / peaks["bf16_matmul_tflops"],
        "valid_fraction": float((idx >= 0).float().mean()),
    }
    if device.type == "cuda" and dqk == 576:  # the memory-side floor: only reading the gathered rows
        from gather_bandwidth import gather_ms

        ms_gather = gather_ms(kv[0], idx[0])
        gathered = int((idx >= 0).sum()) * dqk * kv.element_size()
        entry.update(ms_gather_only=ms_gather, gather_gbps=gathered / ms_gather / 1e6,
                     pct_of_gather_floor=100 * ms_gather / ms)
    return entry


def bench_sparse_mla_decode(B, T, H, K, dqk, dv, device, peaks, quick) -> dict:
    q = torch.randn(B, 1, H, dqk, device=device, dtype=torch.bfloat16)
    kv = torch.randn(B, T, dqk, device=device, dtype=torch.bfloat16)
    idx = strided_causal_indices(B, 1, T, K, device)
    nbytes = int((idx >= 0).sum()) * dqk * kv.element_size()  # selected rows read once
    ms = bench_ms(lambda: sparse_mla(q, kv, idx, dqk**-0.5, dv, use_triton=True), device, quick)
    return {"bytes": nbytes, "ms": ms, "gbps": nbytes / ms / 1e6,
            "pct_copy_bw": 100 * nbytes / ms / 1e6 / peaks["copy_gbps"]}


def _run(results: list, entry: dict, fn) -> None:
    """Run one measurement; record errors (e.g. OOM) instead of aborting the whole run."""
    label = ", ".join(f"{k}={v}" for k, v in entry.items())
    try:
        entry.update(fn())
    except Exception as e:  # noqa: BLE001 - a benchmark keeps going
        entry["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results.append(entry)
    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}
    print(f"[{label}] -> {json.dumps(shown)}", flush=True)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default=None, help="comma-separated L (default 4096,16384,65536,131072)")
    ap.add_argument("--quick", action="store_true", help="fewer reps, first model shape, fewer decode sizes")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU (Triton interpreter)")
    ap.add_argument("--only", choices=("indexer", "mla", "mask"), default=None, help="one kernel family only")
    ap.add_argument("--out", default=None,
                    help="JSON report, overwritten (default: bench/results/kernels.json; kernels_indexer.json with "
                         "--only indexer; none with --smoke or --only mla/mask; '' = print only)")
    args = ap.parse_args(argv)
    if args.out is None and not args.smoke and args.only in (None, "indexer"):
        name = "kernels_indexer.json" if args.only == "indexer" else "kernels.json"
        args.out = str(pathlib.Path(__file__).resolve().parent / "results" / name)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        ap.error("no CUDA device: use --smoke for a CPU sanity run")
    torch.manual_seed(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
        if args.smoke:
            print("triton not importable: kernels fall back to the torch references")

    if args.smoke:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [64]
        shapes = {"tiny": (4, 32)}
        mla = {"heads": (4,), "topk": 16, "dqk": 48, "dv": 32}
        decode_T = lengths
        topk = 16
    else:
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(DEFAULT_LENGTHS)
        shapes = {}
        for name, shape in INDEXER_MODELS.items():  # dedupe identical indexer shapes
            shapes[shape] = shapes.get(shape, ()) + (name,)
        shapes = {"/".join(v): k for k, v in shapes.items()}
        if args.quick:
            shapes = dict(list(shapes.items())[:1])
        mla = {"heads": MLA_HEADS, "topk": TOPK, "dqk": MLA_DQK, "dv": MLA_DV}
        decode_T = sorted({min(131072, max(lengths))} | ({32768} if not args.quick else set()))
        topk = TOPK

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "smoke": args.smoke,
        "torch": torch.__version__, "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "topk": topk, "results": [],
    }
    if device.type != "cuda":
        print("CPU smoke run: timings are Triton-interpreter wall times, not performance numbers; "
              "GPU-only parts (do_bench, autotuning, 8192^3 peak) are skipped.")
    peaks = measure_peaks(device, args.smoke, args.quick)
    report["peaks"] = peaks
    print(f"peaks: {json.dumps(peaks)}", flush=True)

    res = report["results"]
    for L in (lengths if args.only in (None, "mask") else ()):
        _run(res, {"kind": "mask_check", "L": L}, lambda: bench_mask_check(L, device, peaks, args.quick))
    for model, (H, D) in (shapes.items() if args.only in (None, "indexer") else ()):
        for L in lengths:
            _run(res, {"kind": "indexer_prefill", "models": model, "L": L, "H": H, "D": D},
                 lambda: bench_indexer_prefill(L, H, D, topk, device, peaks, args.quick))
        for B in DECODE_BATCHES:
            for T in decode_T:
                _run(res, {"kind": "indexer_decode", "models": model, "B": B, "T": T, "H": H, "D": D},
                     lambda: bench_indexer_decode(B, T, H, D, topk, device, peaks, args.quick))
    for H in (mla["heads"] if args.only in (None, "mla") else ()):
        for L in lengths:
            _run(res, {"kind": "sparse_mla_prefill", "L": L, "H": H, "topk": mla["topk"]},
                 lambda: bench_sparse_mla_prefill(L, H, mla["topk"], mla["dqk"], mla["dv"], device, peaks,
                                                  args.quick))
        for B in DECODE_BATCHES:
            T = max(decode_T)
            _run(res, {"kind": "sparse_mla_decode", "B": B, "T": T, "H": H, "topk": mla["topk"]},
                 lambda: bench_sparse_mla_decode(B, T, H, mla["topk"], mla["dqk"], mla["dv"], device, peaks,
                                                 args.quick))

    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    errors = sum("error" in r for r in res)
    print(f"{len(res)} measurements, {errors} errors" + (f"; wrote {args.out}" if args.out else ""))
    return report


if __name__ == "__main__":
    main()
