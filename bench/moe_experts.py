"""Routed MoE experts at decode: ic::moe_experts vs HF's GlmMoeDsaExperts (grouped_mm) on CUDA.

    python bench/moe_experts.py                        # -> bench/results/moe_experts.json
    python bench/moe_experts.py --tokens 1 --sweep     # + every tile of kernels/moe_experts.sweep_tiles
    python bench/moe_experts.py --smoke                # tiny shape on CPU (Triton interpreter), nothing saved

GLM-4.7-Flash's routed experts (E = 64, H = 2048, I = 1536, top-4, bf16; router weights fp32 as its
router gives them), T tokens of distinct random experts per token. Per T:
  * correctness first: ours vs HF's module on the same weights (max abs difference recorded);
  * call_ms (triton.testing.do_bench: host launches included when slower than the GPU) and graph_ms
    (do_bench_cudagraph: GPU time only, as decode runs under CUDA graphs) of ic::moe_experts and of
    HF's module (its CUDA default, grouped_mm: sort, histc, two grouped GEMMs);
  * bytes = the weights of the distinct experts the T tokens selected (gate_up and down, each read
    once: the floor; ours reads an expert once per token that picked it, duplicates mostly from L2),
    as GB/s and % of the copy bandwidth measured in the same run (bench/kernel_speed.py's
    measure_peaks: read + write bytes / s of a 2 GiB copy);
  * with GLM's shared expert (a SwiGLU MLP of width I, HF's GlmMoeDsaMLP): the op with the shared
    expert folded in (`ours_shared`, what passes/fold_shared_expert.py makes of a decode graph) vs the
    op plus HF's MLP as its three linears (`ours_plus_mlp`: what the graph ran before the fold),
    bytes + the shared weights;
  * with GLM's router tail too (random fp32 logits, a bias, renormalised, scale 2.5): the routing done
    in the op's first launch (`routed_in_op`: ic::moe_route_experts, what passes/fold_moe_route.py
    makes of a decode graph) vs ic::moe_route then the op (`route_then_op`), both with the shared expert;
  * --sweep: each tile of sweep_tiles() in one kernel with the other kernel's default tile,
    graph-timed, and the fastest per kernel (choose the module's defaults from these).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)
from ic_compile.kernels.moe_experts import default_tiles, moe_experts_triton, sweep_tiles

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import bench_ms, measure_peaks, rates  # noqa: E402  (bench/kernel_speed.py)
from prefill import save_result  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "moe_experts.json")  # overwritten by each run
GLM = dict(E=64, H=2048, I=1536, k=4)  # GLM-4.7-Flash's routed experts
SMOKE = dict(E=8, H=96, I=80, k=4)


def hf_experts(shape: dict, device: torch.device):
    """HF's GlmMoeDsaExperts (grouped_mm), bf16, random weights scaled so activations stay O(1)."""
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaExperts

    config = GlmMoeDsaConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"], n_routed_experts=shape["E"],
                             num_experts_per_tok=shape["k"])
    config._experts_implementation = "grouped_mm"
    with torch.device(device):
        module = GlmMoeDsaExperts(config).to(torch.bfloat16).requires_grad_(False)
    module.gate_up_proj.normal_(0, shape["H"] ** -0.5)
    module.down_proj.normal_(0, shape["I"] ** -0.5)
    return module


def hf_shared_expert(shape: dict, device: torch.device):
    """HF's GlmMoeDsaMLP as GLM's shared expert (width I), bf16, random weights."""
    from transformers import GlmMoeDsaConfig
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaMLP

    config = GlmMoeDsaConfig(hidden_size=shape["H"], moe_intermediate_size=shape["I"])
    with torch.device(device):
        return GlmMoeDsaMLP(config, intermediate_size=shape["I"]).to(torch.bfloat16).requires_grad_(False)


def routing(T: int, shape: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [T,k] distinct experts per token, fp32 weights [T,k] (what GLM's router returns)."""
    idx = torch.stack([torch.randperm(shape["E"])[:shape["k"]] for _ in range(T)]).to(device)
    return idx, torch.rand(T, shape["k"], device=device) / shape["k"]


def expert_bytes(idx: torch.Tensor, module) -> int:
    """Bytes of the distinct selected experts' gate_up and down weights (each read once)."""
    per_expert = (module.gate_up_proj[0].numel() + module.down_proj[0].numel()) * module.down_proj.element_size()
    return int(torch.unique(idx).numel()) * per_expert


def graph_ms(fn, device: torch.device) -> float | None:
    """GPU ms of fn replayed from a CUDA graph (None on CPU)."""
    if device.type != "cuda":
        return None
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def kernel_bench_parser(doc: str, result: str) -> argparse.ArgumentParser:
    """The argument parser of a kernel bench with a --smoke mode: the module docstring as help,
    --smoke and --out (a JSON report at `result` by default)."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (Triton interpreter)")
    parser.add_argument("--out", default=None,
                        help=f"JSON report, overwritten (default: {result}; '' = print only; --smoke: print only)")
    return parser


def bench_device(parser: argparse.ArgumentParser, smoke: bool) -> torch.device:
    """CUDA; with --smoke the CPU, where the ops run their kernels in the Triton interpreter."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if device.type == "cpu" and not smoke:
        parser.error("needs CUDA (or --smoke)")
    if smoke:
        import os

        os.environ["IC_KERNELS_TRITON"] = "1"
    return device


def timed(fn, device: torch.device) -> dict:
    """{call_ms, graph_ms}; a failure (e.g. a capture HF's path does not allow) is recorded, not raised."""
    out = {"call_ms": bench_ms(fn, device, quick=True)}
    try:
        out["graph_ms"] = graph_ms(fn, device)
    except Exception as exc:  # noqa: BLE001  (record and go on)
        out["graph_ms"], out["graph_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def inputs(T: int, module, shape: dict, device: torch.device) -> tuple:
    """(hidden [T,H] bf16, expert ids, routing weights, gate_up, down): one decode step's op arguments."""
    idx, w = routing(T, shape, device)
    return torch.randn(T, shape["H"], device=device).bfloat16(), idx, w, module.gate_up_proj, module.down_proj


def bench_tokens(T: int, module, shape: dict, device: torch.device, copy_gbps: float) -> dict:
    x, idx, w, gate_up, down = inputs(T, module, shape, device)
    ours = torch.ops.ic.moe_experts(x, idx, w, gate_up, down)
    with torch.no_grad():
        hf = module(x, idx, w)
    row = {"T": T, **shape, "max_abs_diff_vs_hf": float((ours.float() - hf.float()).abs().max()),
           "bytes": expert_bytes(idx, module), "tiles": [list(t) for t in default_tiles(T, shape["k"], shape["H"],
                                                                                      shape["I"], device)]}
    times = {"ours": timed(lambda: torch.ops.ic.moe_experts(x, idx, w, gate_up, down), device),
             "hf_grouped_mm": timed(lambda: module(x, idx, w), device)}
    for name, t in times.items():
        row.update({f"{name}_{key}": value for key, value in t.items()})
    graphed = {name: t["graph_ms"] for name, t in times.items() if t["graph_ms"]}
    row.update(rates(row["bytes"], graphed or {n: t["call_ms"] for n, t in times.items()}, 1e6, copy_gbps,
                     "gbps", "pct_copy"))
    if times["ours"]["graph_ms"] and times["hf_grouped_mm"]["graph_ms"]:
        row["speedup_graph"] = times["hf_grouped_mm"]["graph_ms"] / times["ours"]["graph_ms"]
    row.update(bench_shared(x, idx, w, gate_up, down, shape, device, row["bytes"], copy_gbps))
    return row


def bench_shared(x, idx, w, gate_up, down, shape: dict, device: torch.device, routed_bytes: int,
                 copy_gbps: float) -> dict:
    """The op with the shared expert folded in vs the op + HF's shared MLP (three linears)."""
    mlp = hf_shared_expert(shape, device)
    shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    folded = lambda: torch.ops.ic.moe_experts(x, idx, w, gate_up, down, None, *shared)  # noqa: E731
    separate = lambda: torch.ops.ic.moe_experts(x, idx, w, gate_up, down) + mlp(x)  # noqa: E731
    row = {"max_abs_diff_shared": float((folded().float() - separate().float()).abs().max()),
           "bytes_with_shared": routed_bytes + sum(t.numel() * t.element_size() for t in shared)}
    times = {"ours_shared": timed(folded, device), "ours_plus_mlp": timed(separate, device)}
    for name, t in times.items():
        row.update({f"{name}_{key}": value for key, value in t.items()})
    graphed = {name: t["graph_ms"] for name, t in times.items() if t["graph_ms"]}
    row.update(rates(row["bytes_with_shared"], graphed or {n: t["call_ms"] for n, t in times.items()}, 1e6,
                     copy_gbps, "gbps", "pct_copy"))
    row.update(bench_routed(x, gate_up, down, shared, shape, device))
    return row


def bench_routed(x, gate_up, down, shared: tuple, shape: dict, device: torch.device) -> dict:
    """The router's tail routed inside the op vs its own launch before the op (with the shared expert)."""
    generator = torch.Generator(device=device).manual_seed(1)
    logits = torch.randn(x.shape[0], shape["E"], device=device, generator=generator)
    route = (logits, 0.3 * torch.randn(shape["E"], device=device, generator=generator), shape["k"], 1, 1, True, 2.5)
    fused = lambda: torch.ops.ic.moe_route_experts(x, *route, gate_up, down, None, *shared)  # noqa: E731

    def separate():
        weights, ids = torch.ops.ic.moe_route(*route)
        return torch.ops.ic.moe_experts(x, ids, weights, gate_up, down, None, *shared)

    row = {"routed_bit_equal": bool(torch.equal(fused(), separate()))}
    for name, fn in (("routed_in_op", fused), ("route_then_op", separate)):
        row.update({f"{name}_{key}": value for key, value in timed(fn, device).items()})
    return row


def sweep(T: int, module, shape: dict, device: torch.device) -> list[dict]:
    """Each sweep tile in one kernel, the other at its default: GPU ms (call ms on CPU), checked first."""
    x, idx, w, gate_up, down = inputs(T, module, shape, device)
    want = torch.ops.ic.moe_experts(x, idx, w, gate_up, down)
    up_default, down_default = default_tiles(T, shape["k"], shape["H"], shape["I"], device)
    rows = []
    for kernel in ("gate_up", "down"):
        for tile in sweep_tiles():
            tiles = (tile, down_default) if kernel == "gate_up" else (up_default, tile)
            row = {"part": "sweep", "T": T, "kernel": kernel, "tile": list(tile)}
            try:
                got = moe_experts_triton(x, idx, w, gate_up, down, tiles=tiles)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
                fn = lambda tiles=tiles: moe_experts_triton(x, idx, w, gate_up, down, tiles=tiles)  # noqa: E731
                row["ms"] = graph_ms(fn, device) or bench_ms(fn, device, quick=True)
            except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory on a smaller card)
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    for kernel in ("gate_up", "down"):
        ok = [r for r in rows if r["kernel"] == kernel and "ms" in r]
        if ok:
            best = min(ok, key=lambda r: r["ms"])
            print(f"T={T} fastest {kernel} tile: {best['tile']} ({best['ms'] * 1e3:.1f} us for the op)", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = kernel_bench_parser(__doc__, RESULT)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8], help="T values (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="also time every sweep tile per kernel")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.smoke)
    shape = SMOKE if args.smoke else GLM
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=args.smoke, quick=True)
    module = hf_experts(shape, device)
    rows = []
    for T in args.tokens:
        rows.append(bench_tokens(T, module, shape, device, peaks["copy_gbps"]))
        print(json.dumps(rows[-1]), flush=True)
        if args.sweep:
            rows += sweep(T, module, shape, device)
    out = "" if args.smoke else (RESULT if args.out is None else args.out)
    save_result(out, rows, copy_gbps=peaks["copy_gbps"], shape=shape)
    return {"rows": rows, "copy_gbps": peaks["copy_gbps"]}


if __name__ == "__main__":
    main()
