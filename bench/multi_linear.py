"""Sibling projections at decode: ic::multi_linear (one launch) vs a cuBLAS GEMV per linear, on CUDA.

    python bench/multi_linear.py                 # -> bench/results/multi_linear.json
    python bench/multi_linear.py --smoke         # tiny shapes on CPU (Triton interpreter), nothing saved
    python bench/multi_linear.py --tokens 1 --cold --out bench/results/multi_linear_cold.json

GLM-4.7-Flash's groups (bf16): of the normed hidden state (K = 2048) q_a 768, kv_a 576, the indexer's
wk 128 (F layers) or q_a + kv_a alone (S layers); of the normed q_a (K = 768) q_b 5120 and the
indexer's wq_b 4096. Lone linears: q_b (S layers), o_proj (K = 5120), the dense layer's down
(K = 10240), the router's fp32 logits of its bf16 [64, 2048] weight (cuBLAS: the model's
linear(x, W.float()), the cast included). Per group and T: the answers agree, then graph_ms (do_bench_cudagraph: GPU time
only, as decode runs under CUDA graphs; the gaps between a graph's kernels are not in it) of the op
and of F.linear per weight, and the weights' bytes as GB/s and % of the copy bandwidth measured in
the same run (bench/kernel_speed.py's measure_peaks). With --cold the weights come from HBM: each
timed graph runs the group on copies of its weights one after another (COLD_BYTES in all), the times
are per group call and include the gap to the next kernel, and ours is timed with and without
programmatic dependent launch.
"""
from __future__ import annotations

import json
import pathlib
import sys

import torch
from torch.nn import functional as F

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)
from ic_compile.kernels import _triton_utils
from ic_compile.kernels._triton_utils import cdiv

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import measure_peaks, rates  # noqa: E402  (bench/kernel_speed.py)
from moe_experts import bench_device, kernel_bench_parser, timed  # noqa: E402  (bench/moe_experts.py)
from prefill import save_result  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "multi_linear.json")  # overwritten by each run
COLD_BYTES = 160 << 20  # --cold: weights cycled through per timed call, over 3x an H100's or H200's L2
GROUPS = {"hidden_f_layer": (2048, (768, 576, 128)), "hidden_s_layer": (2048, (768, 576)),
          "q_resid_f_layer": (768, (5120, 4096)),
          # lone linears (passes/lower_decode_linears takes them at one token, up to its size limit)
          "q_b_s_layer": (768, (5120,)), "o_proj": (5120, (2048,)), "dense_down": (10240, (2048,)),
          "router_fp32_logits": (2048, (64,), torch.float32)}
SMOKE = {"small": (96, (40, 24, 8)), "small_fp32_x": (96, (8,), torch.float32)}


def bench_group(name: str, width: int, rows: tuple, T: int, device: torch.device, copy_gbps: float,
                x_dtype: torch.dtype = torch.bfloat16, cold: bool = False) -> dict:
    """bf16 weights; an fp32 x is HF's router logits: cuBLAS gets the model's linear(x, W.float()).
    cold: each timed call runs the group on copies of its weights in turn (COLD_BYTES in all), so every
    read comes from HBM as in the model's step; times are per group call, and ours is also timed with
    programmatic dependent launch (`ours_pdl`: each call may start while the one before drains)."""
    weights = [(torch.randn(n, width, device=device) * width**-0.5).bfloat16() for n in rows]
    x = torch.randn(T, width, device=device).to(x_dtype)
    ours = torch.ops.ic.multi_linear(x, weights)
    row = {"group": name, "T": T, "K": width, "rows": list(rows), "x_dtype": str(x_dtype).split(".")[-1],
           "max_abs_diff": max(float((o.float() - F.linear(x, w.to(x_dtype)).float()).abs().max())
                               for o, w in zip(ours, weights)),
           "bytes": sum(w.numel() * w.element_size() for w in weights), "cold": cold}
    copies = (cdiv(COLD_BYTES, row["bytes"]) if device.type == "cuda" else 2) if cold else 1  # (2: --smoke)
    sets = [weights] + [[w.clone() for w in weights] for _ in range(copies - 1)]
    times = {"ours": timed(lambda: [torch.ops.ic.multi_linear(x, ws) for ws in sets], device),
             "cublas_per_linear": timed(lambda: [F.linear(x, w.to(x_dtype)) for ws in sets for w in ws], device)}
    if cold:
        default, _triton_utils._PDL = _triton_utils._PDL, True
        try:
            times["ours_pdl"] = timed(lambda: [torch.ops.ic.multi_linear(x, ws) for ws in sets], device)
        finally:
            _triton_utils._PDL = default
    times = {part: {key: value / len(sets) if key.endswith("_ms") and value else value for key, value in t.items()}
             for part, t in times.items()}
    for part, t in times.items():
        row.update({f"{part}_{key}": value for key, value in t.items()})
    graphed = {part: t["graph_ms"] for part, t in times.items() if t["graph_ms"]}
    row.update(rates(row["bytes"], graphed or {p: t["call_ms"] for p, t in times.items()}, 1e6, copy_gbps, "gbps",
                     "pct_copy"))
    if "ours" in graphed and "cublas_per_linear" in graphed:
        row["speedup_graph"] = graphed["cublas_per_linear"] / graphed["ours"]
    return row


def main(argv=None) -> dict:
    parser = kernel_bench_parser(__doc__, RESULT)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="T values (default: %(default)s)")
    parser.add_argument("--cold", action="store_true",
                        help="weights read from HBM (copies cycled past L2), and ours with PDL too")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.smoke)
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=args.smoke, quick=True)
    rows = []
    for name, (width, group_rows, *x_dtype) in (SMOKE if args.smoke else GROUPS).items():
        for T in args.tokens:
            rows.append(bench_group(name, width, group_rows, T, device, peaks["copy_gbps"], *x_dtype, cold=args.cold))
            print(json.dumps(rows[-1]), flush=True)
    save_result("" if args.smoke else (RESULT if args.out is None else args.out), rows, copy_gbps=peaks["copy_gbps"])
    return {"rows": rows, "copy_gbps": peaks["copy_gbps"]}


if __name__ == "__main__":
    main()
