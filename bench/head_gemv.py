"""Absorbed MLA's per-head products at decode: ic::head_gemv (one launch) vs the einsum (cuBLAS), on CUDA.

    python bench/head_gemv.py                 # -> bench/results/head_gemv.json
    python bench/head_gemv.py --smoke         # tiny shapes on CPU (Triton interpreter), nothing saved

GLM-4.7-Flash (20 heads, dn 192, dv 256, Dl 512, bf16): the query's product with W_UK (x [T,20,192],
transposed form, 3.9 MB) and the latent output's with W_UV (x [T,20,512], 5.2 MB). Per product and T:
the answers agree, then CUDA-graph time (GPU only, as decode runs) of the op and of the einsum, each over
COPIES distinct weights per replay (more bytes than the L2 holds: each call reads its weight from
memory, as in the model's step, where 47 layers' weights pass through), as µs per call and % of the
copy bandwidth measured in the same run (bench/kernel_speed.py's measure_peaks).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import measure_peaks, rates  # noqa: E402  (bench/kernel_speed.py)
from moe_experts import bench_device, timed  # noqa: E402  (bench/moe_experts.py)
from prefill import save_result  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "head_gemv.json")  # overwritten by each run
SHAPE = dict(heads=20, dn=192, dv=256, dl=512)
SMOKE = dict(heads=3, dn=24, dv=40, dl=48)
COPIES = 12  # x 9.2 MB of kv_b per layer: 110 MB, above an H100's / H200's 50 MB L2


def products(shape: dict) -> dict:
    """name -> (x width, transposed, slice of the [H, dn+dv, Dl] weight, einsum of x [T,H,K] with it)."""
    dn = shape["dn"]
    return {"q_nope_x_W_UK": (dn, True, slice(0, dn), "thd,hdc->thc"),
            "latent_out_x_W_UV": (shape["dl"], False, slice(dn, None), "thc,hvc->thv")}


def bench_product(name: str, spec: tuple, T: int, shape: dict, copies: int, device, copy_gbps: float) -> dict:
    width, transposed, part, pattern = spec
    heads, rows, dl = shape["heads"], shape["dn"] + shape["dv"], shape["dl"]
    weights = [(torch.randn(heads * rows, dl, device=device) * dl**-0.5).bfloat16().view(heads, rows, dl)[:, part]
               for _ in range(copies)]
    x = torch.randn(T, heads, width, device=device).bfloat16()
    ours, want = torch.ops.ic.head_gemv(x, weights[0], transposed), torch.einsum(pattern, x, weights[0])
    row = {"product": name, "T": T, **shape, "copies": copies,
           "max_abs_diff": float((ours.float() - want.float()).abs().max()),
           "bytes": weights[0].numel() * weights[0].element_size()}
    times = {"ours": timed(lambda: [torch.ops.ic.head_gemv(x, w, transposed) for w in weights], device),
             "cublas_einsum": timed(lambda: [torch.einsum(pattern, x, w) for w in weights], device)}
    for part_name, t in times.items():  # per call: the replay did `copies` calls
        row.update({f"{part_name}_{key}": (value / copies if isinstance(value, float) else value)
                    for key, value in t.items()})
    graphed = {p: row[f"{p}_graph_ms"] for p in times if row.get(f"{p}_graph_ms")}
    row.update(rates(row["bytes"], graphed or {p: row[f"{p}_call_ms"] for p in times}, 1e6, copy_gbps, "gbps",
                     "pct_copy"))
    if len(graphed) == 2:
        row["speedup_graph"] = graphed["cublas_einsum"] / graphed["ours"]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4], help="T values (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Triton interpreter)")
    parser.add_argument("--out", default=None,
                        help=f"JSON report, overwritten (default: {RESULT}; '' = print only; --smoke: print only)")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.smoke)
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=args.smoke, quick=True)
    shape, copies = (SMOKE, 2) if args.smoke else (SHAPE, COPIES)
    rows = []
    for name, spec in products(shape).items():
        for T in args.tokens:
            rows.append(bench_product(name, spec, T, shape, copies, device, peaks["copy_gbps"]))
            print(json.dumps(rows[-1]), flush=True)
    save_result("" if args.smoke else (RESULT if args.out is None else args.out), rows, copy_gbps=peaks["copy_gbps"])
    return {"rows": rows, "copy_gbps": peaks["copy_gbps"]}


if __name__ == "__main__":
    main()
