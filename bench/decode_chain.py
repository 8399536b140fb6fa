"""A decode layer's weight-reading kernels back to back from one CUDA graph, with and without
programmatic dependent launch (PDL: kernels/_triton_utils.pdl), at one token.

    python bench/decode_chain.py                # -> bench/results/decode_chain.json
    python bench/decode_chain.py --attention    # each layer with its absorbed sparse-MLA decode too
    python bench/decode_chain.py --smoke        # tiny shapes on CPU (Triton interpreter), nothing saved

Per layer (GLM-4.7-Flash's shapes, bf16; every layer has its own weights, so the reads come from
HBM as in the model's step): ic::multi_linear of q_a + kv_a (K = 2048), an RMSNorm in torch ops
(plain launches between ours, as Inductor's kernels sit between them in the model), q_b (K = 768),
o_proj (K = 5120), the router's fp32 logits of its bf16 weight, ic::moe_route, ic::moe_experts
(top-4 of 8 experts per layer here, not 64, so 20 layers fit; plus the shared expert) and the
residual add. The graph is replayed with PDL off, on, and on without the L2 prefetch (each captured
anew); the answers must be equal, bit for bit. Reported: ms per layer for each, and the weight bytes
read per layer over the copy bandwidth measured in the same run (bench/kernel_speed.py's
measure_peaks).

--attention: each layer also runs GLM-4.7-Flash's absorbed sparse-MLA decode between q_b and o_proj
(q . W_UK, ic::sparse_mla over 2048 of the layer's own 200K cached latent rows, . W_UV; the lowering's
own lowered_absorbed_mla), the latency-bound part of a step an overlap would have to hide.
"""
from __future__ import annotations

import json
import pathlib
import sys

import torch

import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)
from ic_compile.kernels import _triton_utils

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import measure_peaks  # noqa: E402  (bench/kernel_speed.py)
from moe_experts import bench_device, kernel_bench_parser  # noqa: E402  (bench/moe_experts.py)
from prefill import save_result  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "decode_chain.json")  # overwritten by each run
GLM = dict(H=2048, q_a=768, kv_a=576, q_b=5120, o_in=5120, E=8, k=4, I=1536, layers=20,
           heads=20, nope=192, rope=64, latent=512, v=256, T=200_000, topk=2048)
SMOKE = dict(H=64, q_a=32, kv_a=24, q_b=80, o_in=80, E=8, k=4, I=48, layers=2,
             heads=4, nope=12, rope=8, latent=16, v=20, T=64, topk=16)


def layer_weights(shape: dict, device: torch.device) -> dict:
    """One layer's bf16 weights (nn.Linear layouts; experts as HF's [E,2I,H] / [E,H,I])."""
    H, I, E = shape["H"], shape["I"], shape["E"]

    def w(*size):
        return (torch.randn(*size, device=device) * size[-1] ** -0.5).bfloat16()

    return {"q_a": w(shape["q_a"], H), "kv_a": w(shape["kv_a"], H), "q_b": w(shape["q_b"], shape["q_a"]),
            "o_proj": w(H, shape["o_in"]), "router": w(E, H), "bias": torch.zeros(E, device=device),
            "gate_up": w(E, 2 * I, H), "down": w(E, H, I), "shared": (w(I, H), w(I, H), w(H, I))}


def layer_bytes(weights: dict, shape: dict) -> int:
    """Weight bytes one token's layer reads: the projections, the router, k experts and the shared one."""
    dense = sum(weights[name].numel() for name in ("q_a", "kv_a", "q_b", "o_proj", "router"))
    expert = weights["gate_up"][0].numel() + weights["down"][0].numel()
    return 2 * (dense + shape["k"] * expert + sum(t.numel() for t in weights["shared"]))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def attention_inputs(shape: dict, device: torch.device) -> dict:
    """One layer's absorbed-MLA decode inputs: kv_b_proj's weight, a cache of T latent / rope rows and
    one query's top-k indices."""
    heads, T = shape["heads"], shape["T"]
    kv_b = (torch.randn(heads * (shape["nope"] + shape["v"]), shape["latent"], device=device)
            * shape["latent"] ** -0.5).bfloat16()
    latent = torch.randn(1, 1, T, shape["latent"], device=device).bfloat16()
    rope = torch.randn(1, 1, T, shape["rope"], device=device).bfloat16()
    idx = torch.randperm(T, device=device)[:shape["topk"]].int().view(1, 1, -1)
    return {"kv_b": kv_b, "latent": latent, "rope": rope, "idx": idx}


def attention(q: torch.Tensor, weights: dict, shape: dict) -> torch.Tensor:
    """q [1, heads * (nope + rope)] -> the attention output [1, heads * v] (lowered_absorbed_mla)."""
    from ic_compile.passes.lower_sparse_attention import lowered_absorbed_mla

    heads, width = shape["heads"], shape["nope"] + shape["rope"]
    a = weights["attention"]
    out = lowered_absorbed_mla(q.view(1, 1, heads, width).transpose(1, 2), a["latent"], a["rope"], a["kv_b"],
                               a["idx"], width ** -0.5, shape["nope"])  # [1, heads, 1, v]
    return out.transpose(1, 2).reshape(1, heads * shape["v"])


def layer(x: torch.Tensor, weights: dict, shape: dict) -> torch.Tensor:
    """x [1,H] -> the next layer's input (a decode layer's chain of weight reads). Without attention
    inputs in `weights` the attention is left out (o_proj reads q_b's output plus kv_a's first column,
    a stand-in with both as inputs)."""
    q_a, kv_a = torch.ops.ic.multi_linear(x, [weights["q_a"], weights["kv_a"]])
    (q,) = torch.ops.ic.multi_linear(rms_norm(q_a), [weights["q_b"]])
    attended = attention(q, weights, shape) if "attention" in weights else q[:, :shape["o_in"]] + kv_a[:, :1]
    (attn,) = torch.ops.ic.multi_linear(attended, [weights["o_proj"]])
    h = x + attn
    (logits,) = torch.ops.ic.multi_linear(rms_norm(h).float(), [weights["router"]])
    route_w, ids = torch.ops.ic.moe_route(logits, weights["bias"], shape["k"], 1, 1, True, 1.0)
    gate, up, down = weights["shared"]
    return h + torch.ops.ic.moe_experts(rms_norm(h), ids, route_w, weights["gate_up"], weights["down"], None,
                                        gate, up, down)


def run_chain(x: torch.Tensor, layers: list[dict], shape: dict) -> torch.Tensor:
    for weights in layers:
        x = layer(x, weights, shape)
    return x


def replay_ms(x: torch.Tensor, layers: list[dict], shape: dict, pdl: bool, prefetch: bool,
              reps: int) -> tuple[float, torch.Tensor]:
    """(ms per replay, the output) of the chain captured with PDL on or off (prefetch: the L2
    prefetch before the wait)."""
    default = _triton_utils._PDL, _triton_utils._PDL_PREFETCH
    _triton_utils._PDL, _triton_utils._PDL_PREFETCH = pdl, prefetch
    try:
        run_chain(x, layers, shape)  # compile / warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_chain(x, layers, shape)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps, out.clone()
    finally:
        _triton_utils._PDL, _triton_utils._PDL_PREFETCH = default


def main(argv=None) -> dict:
    parser = kernel_bench_parser(__doc__, RESULT)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--attention", action="store_true",
                        help="run the sparse-MLA decode in each layer too")
    args = parser.parse_args(argv)
    device = bench_device(parser, args.smoke)
    shape = SMOKE if args.smoke else GLM
    torch.manual_seed(0)
    layers = [layer_weights(shape, device) for _ in range(shape["layers"])]
    if args.attention:
        for weights in layers:
            weights["attention"] = attention_inputs(shape, device)
    x = torch.randn(1, shape["H"], device=device).bfloat16()
    if device.type != "cuda":  # the interpreter: the chain runs and gives a finite answer
        out = run_chain(x, layers, shape)
        assert out.shape == x.shape and out.float().isfinite().all()
        print(json.dumps({"smoke": True, "layers": shape["layers"], "attention": args.attention}))
        return {}
    peaks = measure_peaks(device, smoke=False, quick=True)
    variants = {"plain": (False, False), "pdl": (True, True), "pdl_no_prefetch": (True, False)}
    runs = {name: replay_ms(x, layers, shape, *switches, args.reps) for name, switches in variants.items()}
    per_layer = layer_bytes(layers[0], shape)
    row = {"layers": shape["layers"], "attention": args.attention, "bytes_per_layer": per_layer,
           "pdl_available": _triton_utils._has_grid_dependency_control(device.index),
           **{f"us_per_layer_{name}": 1e3 * ms / shape["layers"] for name, (ms, _) in runs.items()},
           "equal": all(torch.equal(out, runs["plain"][1]) for _, out in runs.values()),
           "copy_gbps": peaks["copy_gbps"]}
    row["us_per_layer_at_copy"] = per_layer / peaks["copy_gbps"] / 1e3
    for name in variants:
        if name != "plain":
            row[f"speedup_{name}"] = row["us_per_layer_plain"] / row[f"us_per_layer_{name}"]
    print(json.dumps(row), flush=True)
    save_result(RESULT if args.out is None else args.out, [row], shape=shape)
    return row


if __name__ == "__main__":
    main()
