"""Absorbed MLA's products at decode: ic::head_linear (one launch) vs the einsum (cuBLAS), on CUDA.

    python bench/head_linear.py                 # -> bench/results/head_linear.json
    python bench/head_linear.py --smoke         # tiny shapes on CPU (Triton interpreter), nothing saved
    python bench/head_linear.py --cold --out bench/results/head_linear_cold.json
    python bench/head_linear.py --tiles 32x128 64x64 --out ''    # given tiles, not default_tile's

GLM-4.7-Flash (H=20, dn=192, dv=256, Dl=512, bf16; W = kv_b_proj.weight.view(H, dn+dv, Dl)): the
query's product with W_UK, q_nope [T,20,192] (a transposed view of q [1,20,T,256]) x W[:, :dn]
.transpose(1, 2) (3.9 MB, unit stride along N), and the latent output's with W_UV, [T,20,512] x
W[:, dn:] (5.2 MB, unit stride along K), as passes/lower_sparse_attention.py `_absorbed_mla` runs them.
Per product and T: the answers agree, then graph_ms (do_bench_cudagraph: GPU time only, as decode runs
under CUDA graphs) of the op and of the lowering's einsum, and the weight's bytes as GB/s and % of the
copy bandwidth measured in the same run (bench/kernel_speed.py's measure_peaks). Without --cold the
weight sits in L2 between replays (reads above copy bandwidth are possible); with --cold each timed
graph runs the product on copies of W one after another (COLD_BYTES in all, past the L2), as the
model's step reads 47 layers' weights, and the times are per call, the gap to the next kernel included.
"""
from __future__ import annotations

import json
import pathlib
import sys

import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)
from ic_compile.kernels._triton_utils import cdiv
from ic_compile.kernels.head_linear import head_linear_triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import measure_peaks, rates  # noqa: E402  (bench/kernel_speed.py)
from moe_experts import bench_device, kernel_bench_parser, timed  # noqa: E402  (bench/moe_experts.py)
from prefill import save_result  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "head_linear.json")  # overwritten by each run
COLD_BYTES = 160 << 20  # --cold: weights cycled through per timed call, over 3x an H100's or H200's L2
SHAPE = dict(H=20, dn=192, dv=256, Dl=512)
SMOKE = dict(H=3, dn=24, dv=40, Dl=48)


def products(shape: dict) -> dict:
    """name -> (x [T,H,K] of q [1,H,T,dn+64] or of the latent out [T,H,Dl], the weight [H,N,K] of W [H,dn+dv,Dl],
    the lowering's einsum of x and W as a [T,H,N] view)."""
    dn = shape["dn"]
    return {"q_nope_x_W_UK": (lambda q, out: q[..., :dn][0].transpose(0, 1), lambda w: w[:, :dn].transpose(1, 2),
                              lambda x, w: torch.einsum("bhsd,hdc->bshc", x.transpose(0, 1)[None], w[:, :dn])[0]),
            "latent_out_x_W_UV": (lambda q, out: out, lambda w: w[:, dn:],
                                  lambda x, w: torch.einsum("bshc,hvc->bhsv", x[None], w[:, dn:])[0].transpose(0, 1))}


def bench_product(name: str, T: int, shape: dict, device: torch.device, copy_gbps: float, cold: bool = False,
                  tile: tuple[int, int] | None = None) -> dict:
    """bf16; cold: each timed call runs the product on copies of W in turn (COLD_BYTES in all); tile: the
    kernel at that (BLOCK_N, BLOCK_K) instead of default_tile (head_linear_triton)."""
    heads, dn, dv, dl = shape["H"], shape["dn"], shape["dv"], shape["Dl"]
    take_x, take_weight, einsum = products(shape)[name]
    w = (torch.randn(heads * (dn + dv), dl, device=device) * dl**-0.5).bfloat16().view(heads, dn + dv, dl)
    x = take_x(torch.randn(1, heads, T, dn + 64, device=device).bfloat16(),
               torch.randn(T, heads, dl, device=device).bfloat16())
    op = (lambda x, w: torch.ops.ic.head_linear(x, w)) if tile is None else \
        (lambda x, w: head_linear_triton(x, w, tile=tile))
    ours = op(x, take_weight(w))
    row = {"product": name, "T": T, **shape, "tile": list(tile) if tile else None, "cold": cold,
           "max_abs_diff": float((ours.float() - einsum(x, w).float()).abs().max()),
           "bytes": take_weight(w).numel() * w.element_size()}
    copies = (cdiv(COLD_BYTES, w.numel() * w.element_size()) if device.type == "cuda" else 2) if cold else 1
    sets = [w] + [w.clone() for _ in range(copies - 1)]
    weights = [take_weight(ws) for ws in sets]
    times = {"ours": timed(lambda: [op(x, ws) for ws in weights], device),
             "cublas_einsum": timed(lambda: [einsum(x, ws) for ws in sets], device)}
    times = {part: {key: value / len(sets) if key.endswith("_ms") and value else value for key, value in t.items()}
             for part, t in times.items()}
    for part, t in times.items():
        row.update({f"{part}_{key}": value for key, value in t.items()})
    graphed = {part: t["graph_ms"] for part, t in times.items() if t["graph_ms"]}
    row.update(rates(row["bytes"], graphed or {p: t["call_ms"] for p, t in times.items()}, 1e6, copy_gbps, "gbps",
                     "pct_copy"))
    if len(graphed) == 2:
        row["speedup_graph"] = graphed["cublas_einsum"] / graphed["ours"]
    return row


def main(argv=None) -> dict:
    parser = kernel_bench_parser(__doc__, RESULT)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4], help="T values (default: %(default)s)")
    parser.add_argument("--cold", action="store_true", help="weights read from HBM (copies cycled past L2)")
    parser.add_argument("--tiles", nargs="+", default=None, metavar="NxK",
                        help="time the kernel at these BLOCK_NxBLOCK_K tiles (default: default_tile's)")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.smoke)
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=args.smoke, quick=True)
    tiles = [tuple(int(v) for v in tile.split("x")) for tile in args.tiles] if args.tiles else [None]
    rows = []
    for name in products(SHAPE):
        for T in args.tokens:
            for tile in tiles:
                rows.append(bench_product(name, T, SMOKE if args.smoke else SHAPE, device, peaks["copy_gbps"],
                                          args.cold, tile))
                print(json.dumps(rows[-1]), flush=True)
    save_result("" if args.smoke else (RESULT if args.out is None else args.out), rows, copy_gbps=peaks["copy_gbps"])
    return {"rows": rows, "copy_gbps": peaks["copy_gbps"]}


if __name__ == "__main__":
    main()
