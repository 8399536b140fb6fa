"""Decode on the H200: one new token against a long context.

    python bench/decode.py --lengths 16384 131072   # -> bench/results/decode.json

Parts (--parts):
  * model (2 layers of the paper's 30B shape as HF GlmMoeDsa, bf16, as bench/prefill.py): a
    prefill of L tokens fills a DynamicCache; then each variant times single-token steps at
    context L (the cache's tensors are put back after every step, so each step sees L past
    tokens and the shapes never change). Per step: median wall ms (CUDA events around the
    call: what a plain torch.compile user sees, host overhead included, no CUDA graphs) and
    the GPU time (torch.profiler: the summed durations of the step's kernels). The gap is
    host time. The top kernels of each variant are listed.
  * static: the same model with a StaticCache (fixed shapes), one step at position L:
    torch.compile(mode="reduce-overhead") (CUDA graphs), compile default and ours, with
    ("-graphs": options={"cudagraphs": True}) and without CUDA graphs. The cache is allocated by one
    uncompiled token (so its tensors are static addresses, which CUDA graphs need for the in-place
    writes) and rewound to L before every step (transformers 5 writes at the cache's own running
    length, not at cache_position: without the rewind, repeated steps wrote past max_cache_len and
    raised a device-side assert).
  * generate: HF `generate` on the same model with one StaticCache (ic_compile.static_cache, reset
    before each call): per-token decode ms = (time of 1 + N new tokens - time of 1) / N. Variants:
    "hf-auto-compile" (forward uncompiled: on CUDA with a static cache generate compiles the decode
    forward itself, Inductor with its default compile_config) and ours "-graphs" (forward compiled
    with options={"cudagraphs": True}, generate(disable_compile=True)).
  * ops (B in {1, 16}, T = L): the decode indexer (scores + top-k 2048) with torch.topk or
    kernels/topk_select.py, in fp8 (every key quantised per call, or an fp8 key cache), and sparse
    MLA over 2048 selected rows, each timed per call (triton.testing.do_bench: host launches
    included when they are slower than the GPU) and replayed from a CUDA graph
    (do_bench_cudagraph: GPU time only, as serving engines run decode); with the bytes each must
    read (K once / the selected rows once) over the measured copy bandwidth, and (the indexer
    rows) the op's kernels by time (`kernels`: kernel_profile of eager calls).
  * host: microseconds of host time per call of each custom op and its pieces (perf_counter), and
    which of them synchronise with the GPU (torch.cuda.set_sync_debug_mode).
"""

import argparse
import json
import pathlib
import sys
import time

import torch

import ic_compile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import indexer_inputs, measure_peaks, strided_causal_indices  # noqa: E402  (bench/kernel_speed.py)
from prefill import CONFIG, build_model, save_result, time_ms, variant  # noqa: E402  (bench/prefill.py)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "decode.json")  # overwritten by each run

TOPK = 2048


# ----------------------------------------------------------------------------- model decode

def cache_tensors(cache) -> list[dict]:
    """The tensors each cache layer holds (keys, values, indexer keys...), to put back later."""
    return [{name: value for name, value in vars(layer).items() if isinstance(value, torch.Tensor)}
            for layer in cache.layers]


def restore(cache, saved: list[dict]) -> None:
    for layer, tensors in zip(cache.layers, saved):
        for name, value in tensors.items():
            setattr(layer, name, value)


def prefilled_cache(model, L: int):
    """A DynamicCache holding L random tokens (prefilled by ours-FF-inductor: fits at 128K)."""
    from transformers import DynamicCache

    ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        variant(model, "ours-FF-inductor")(ids, cache=cache, use_cache=True, logits_to_keep=1)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return cache


def step_times(step, reps: int) -> tuple[float, float, list]:
    """(median wall ms per call of step(), GPU ms per call, top kernels [(name, us per call)])."""
    with torch.no_grad():
        for _ in range(2):  # compile, autotune (time_ms warms once more)
            step()
        wall = time_ms(step, reps)
    kernels = kernel_profile(step, reps)
    return wall, kernels["gpu_ms"], kernels["top_kernels"]


def kernel_profile(step, reps: int, top: int = 8) -> dict:
    """The GPU kernels of one call of step() (torch.profiler over `reps` calls; kernels replayed from a
    CUDA graph are listed too): summed kernel time (gpu_ms; wall time minus it = launch gaps and host
    time), kernel launches per call, and the `top` kernels by time [(name, us per call, launches per call)]."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / reps, e.count / reps) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    kernels.sort(key=lambda row: -row[1])
    return {"gpu_ms": sum(us for _, us, _ in kernels) / 1e3, "launches": sum(n for _, _, n in kernels),
            "top_kernels": [(name[:90], round(us, 1), round(n, 1)) for name, us, n in kernels[:top]]}


def recorded_row(part: str, L: int, name: str, measure) -> dict:
    """A printed result row of one variant: measure() -> its fields (an error is recorded, not
    raised: one variant failing must not lose the rest)."""
    row = {"part": part, "L": L, "variant": name}
    try:
        row.update(measure())
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print(json.dumps(row), flush=True)
    return row


def variant_row(part: str, L: int, name: str, step, reps: int) -> dict:
    """One variant's step_times as a printed result row."""
    return recorded_row(part, L, name, lambda: dict(zip(("wall_ms", "gpu_ms", "top_kernels"), step_times(step, reps))))


def model_decode(model, L: int, variants: list[str], reps: int) -> list[dict]:
    cache = prefilled_cache(model, L)
    saved = cache_tensors(cache)
    token = torch.randint(0, CONFIG["vocab_size"], (1, 1), device="cuda")
    rows = []
    for name in variants:
        fn = variant(model, name)

        def step():
            restore(cache, saved)
            fn(token, cache=cache, use_cache=True)

        rows.append(variant_row("model", L, name, step, reps))
        restore(cache, saved)
    return rows


def static_variant(model, name: str):
    """name: a bench/prefill.py variant, "compile-reduce-overhead" (torch.compile's CUDA graphs) or
    ours with "-graphs" (options={"cudagraphs": True})."""
    torch._dynamo.reset()
    if name == "compile-reduce-overhead":
        return torch.compile(model, mode="reduce-overhead")
    if name.endswith("-graphs"):
        return torch.compile(model, backend="indexcache", options=graphs_options(name))
    return variant(model, name)


def graphs_options(name: str) -> dict:
    """Backend options of an "ours-<plan>-<lowering>-graphs" variant (ours-FF-inductor-graphs)."""
    _, plan, lowering, _ = name.split("-")
    return {"plan": plan, "lowering": lowering, "cudagraphs": True}


def rewind(cache, length: int) -> None:
    """Set every layer's running length (where transformers 5 writes the next token) to `length`.
    Two multi-tensor launches for all layers: a fill_ per layer cost ~5 us of host time each, ~0.5 ms of
    a 47-layer model's timed decode step."""
    lengths = [tensor for layer in cache.layers
               for tensor in (layer.cumulative_length, getattr(layer, "indexer_cumulative_length", None))
               if tensor is not None]
    torch._foreach_zero_(lengths)
    torch._foreach_add_(lengths, length)


def static_decode(model, L: int, variants: list[str], reps: int) -> list[dict]:
    """Single-token steps at position L of a StaticCache holding L prefilled tokens (fixed shapes:
    what CUDA graphs need; every step rewrites the same slot)."""
    ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
    cache = ic_compile.static_cache(model, 1, L + 8)
    with torch.no_grad():
        variant(model, "ours-FF-inductor")(ids, cache=cache, use_cache=True, cache_position=torch.arange(L, device="cuda"),
                                           logits_to_keep=1)
    torch.cuda.empty_cache()
    token = torch.randint(0, CONFIG["vocab_size"], (1, 1), device="cuda")
    position = torch.tensor([L], device="cuda")
    rows = []
    for name in variants:
        fn = static_variant(model, name)

        def step():
            rewind(cache, L)
            torch.compiler.cudagraph_mark_step_begin()
            fn(token, cache=cache, use_cache=True, cache_position=position)

        rows.append(variant_row("static", L, name, step, reps))
    return rows


def compile_forward(model, name: str) -> dict:
    """Set model.forward for generate variant `name`; -> the extra generate kwargs it needs."""
    torch._dynamo.reset()
    model.__dict__.pop("forward", None)  # the class's forward again (undoes the previous variant)
    if name == "hf-auto-compile":
        return {}
    model.forward = torch.compile(model.forward, backend="indexcache", options=graphs_options(name))
    return {"disable_compile": True}  # else generate compiles the decode forward around ours


def generate_decode(model, L: int, variants: list[str], new_tokens: int, reps: int) -> list[dict]:
    ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
    cache = ic_compile.static_cache(model, 1, L + new_tokens + 1)
    rows = []
    for name in variants:
        extra = compile_forward(model, name)

        def run(n):
            cache.reset()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           cache=cache, **extra)

        def measure():
            with torch.no_grad():
                run(new_tokens + 1)  # compile, record
                first = time_ms(lambda: run(1), reps)
                total = time_ms(lambda: run(new_tokens + 1), reps)
            return {"first_token_ms": first, "decode_ms_per_token": (total - first) / new_tokens,
                    "new_tokens": new_tokens}

        rows.append(recorded_row("generate", L, name, measure))
    model.__dict__.pop("forward", None)
    return rows


# ----------------------------------------------------------------------------- ops

def mla_decode_inputs(B: int, T: int):
    """Absorbed-MLA decode inputs of the model's shape: q [B,1,H,576], kv [B,T,576] (bf16), and
    2048 indices [B,1,2048] spread over the context."""
    q = torch.randn(B, 1, CONFIG["num_attention_heads"], 576, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(B, T, 576, device="cuda", dtype=torch.bfloat16)
    return q, kv, strided_causal_indices(B, 1, T, TOPK, "cuda")


def call_and_graph_ms(fn) -> tuple[float, float]:
    import triton.testing

    fn()  # autotune outside the timings
    torch.cuda.synchronize()
    return (triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"),
            triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def op_decode(T: int, B: int, copy_gbps: float) -> list[dict]:
    from ic_compile.kernels.indexer_topk import indexer_topk_triton
    from ic_compile.kernels.sparse_attention import sparse_mla

    rows = []
    H, D = CONFIG["index_n_heads"], CONFIG["index_head_dim"]
    q, k, w = indexer_inputs(B, 1, T, H, D, "cuda")
    k_bytes = k.numel() * k.element_size()
    for selection in ("torch", "triton"):
        sort = selection == "torch"

        def op():
            return indexer_topk_triton(q, k, w, TOPK, sorted=sort, selection=selection)

        call, graph = call_and_graph_ms(op)
        rows.append({"part": "ops", "op": f"indexer decode, selection={selection}", "B": B, "T": T,
                     "call_ms": call, "graph_ms": graph, "floor_ms": k_bytes / copy_gbps / 1e6,
                     "kernels": kernel_profile(op, 20, top=6)})
    rows += fp8_indexer_decode(q, k, w, copy_gbps)
    qm, kv, idx = mla_decode_inputs(B, T)
    row_bytes = int((idx >= 0).sum()) * kv.shape[-1] * kv.element_size()
    call, graph = call_and_graph_ms(lambda: sparse_mla(qm, kv, idx, 576 ** -0.5, 512, use_triton=True))
    rows.append({"part": "ops", "op": f"sparse MLA decode, H={qm.shape[2]}", "B": B, "T": T, "call_ms": call,
                 "graph_ms": graph, "floor_ms": row_bytes / copy_gbps / 1e6})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def fp8_indexer_decode(q, k, w, copy_gbps: float) -> list[dict]:
    """indexer_precision="fp8" at decode: every key quantised per call, and an fp8 key cache
    (kernels/fp8_key_cache.py: this step's one new key quantised into the copy, which the scores read)."""
    from ic_compile.kernels.fp8_key_cache import fp8_key_mirror
    from ic_compile.kernels.indexer_topk import indexer_topk_triton

    B, T, D = k.shape
    new, position = k[:, -1:].clone(), torch.tensor([T - 1], device=k.device)
    fp8_key_mirror(k[:, :T - 1], k[:, :T - 1], torch.arange(T - 1, device=k.device))  # the cache's past keys

    def cached():
        k8, scales = fp8_key_mirror(k, new, position)
        return indexer_topk_triton(q, k8, w, TOPK, sorted=False, indexer_precision="fp8", k_scale=scales)

    variants = {"per-call quantisation": (lambda: indexer_topk_triton(q, k, w, TOPK, sorted=False,
                                                                      indexer_precision="fp8"), B * T * D * 2),
                "key cache": (cached, B * T * (D + 4))}
    rows = []
    for name, (fn, floor_bytes) in variants.items():
        call, graph = call_and_graph_ms(fn)
        rows.append({"part": "ops", "op": f"indexer decode fp8, {name}, selection=triton", "B": B, "T": T,
                     "call_ms": call, "graph_ms": graph, "floor_ms": floor_bytes / copy_gbps / 1e6,
                     "kernels": kernel_profile(fn, 20, top=6)})
    return rows


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call of fn (perf_counter over `calls` calls; the GPU keeps up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def host_profile(T: int) -> list[dict]:
    """Where the host time of one decode call goes (B = 1, context T): each custom op, its Python
    API, its Triton function, and pieces of them, timed with perf_counter; then whether any of
    them synchronises with the GPU (torch.cuda.set_sync_debug_mode)."""
    import ic_compile.kernels.ops  # noqa: F401  (registers torch.ops.ic)
    from ic_compile.kernels.indexer_topk import indexer_topk_triton
    from ic_compile.kernels.sparse_attention import sparse_mla_triton
    from ic_compile.kernels.topk_select import topk_select

    H, D = CONFIG["index_n_heads"], CONFIG["index_head_dim"]
    q, k, w = indexer_inputs(1, 1, T, H, D, "cuda")
    key_range = torch.tensor([[[0, T - 1, T]]], dtype=torch.int32, device="cuda")
    qm, kv, idx = mla_decode_inputs(1, T)
    scores = torch.randn(1, T, device="cuda")
    empty_op = torch.library.custom_op("icbench::empty", mutates_args=(), schema="(Tensor x) -> Tensor")(
        lambda x: torch.empty_like(x))
    fns = {
        "ic::indexer_topk (key_range)": lambda: torch.ops.ic.indexer_topk(q, k, w, TOPK, None, False, False, key_range),
        "ic::indexer_topk (no mask)": lambda: torch.ops.ic.indexer_topk(q, k, w, TOPK, None, True, False),
        "indexer_topk_triton (no mask)": lambda: indexer_topk_triton(q, k, w, TOPK, sorted=False),
        "topk_select [1, T]": lambda: topk_select(scores, TOPK, sorted=False),
        "torch.topk [1, T]": lambda: torch.topk(scores, TOPK, dim=-1),
        "ic::sparse_mla": lambda: torch.ops.ic.sparse_mla(qm, kv, idx, 576 ** -0.5, 512, True),
        "sparse_mla_triton": lambda: sparse_mla_triton(qm, kv, idx, 576 ** -0.5, 512),
        "sparse_mla_triton, num_splits=1": lambda: sparse_mla_triton(qm, kv, idx, 576 ** -0.5, 512, num_splits=1),
        "custom op returning empty_like": lambda: empty_op(q),
        "torch.empty_like": lambda: torch.empty_like(q),
    }
    rows = []
    for name, fn in fns.items():
        rows.append({"part": "host", "op": name, "T": T, "host_us_per_call": host_us(fn)})
        print(json.dumps(rows[-1]), flush=True)
    torch.cuda.set_sync_debug_mode("warn")
    for name, fn in fns.items():
        print("sync check:", name, flush=True)
        fn()
    torch.cuda.set_sync_debug_mode("default")
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--variants", nargs="+",
                        default=["hf-eager", "compile-default", "ours-FF-inductor", "ours-FS-inductor"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="ops part")
    parser.add_argument("--parts", nargs="+", default=["ops", "model", "static"],
                        choices=["ops", "model", "static", "host", "generate"])
    parser.add_argument("--static-variants", nargs="+",
                        default=["compile-reduce-overhead", "compile-default", "ours-FF-inductor-graphs",
                                 "ours-FS-inductor-graphs", "ours-FF-inductor"])
    parser.add_argument("--generate-variants", nargs="+",
                        default=["hf-auto-compile", "ours-FF-inductor-graphs", "ours-FS-inductor-graphs"])
    parser.add_argument("--new-tokens", type=int, default=32, help="generate part")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=RESULT,
                        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = parser.parse_args()
    device = torch.device("cuda")
    peaks = measure_peaks(device, smoke=False, quick=True)
    rows = []
    if "ops" in args.parts:
        for T in args.lengths:
            for B in args.batches:
                rows += op_decode(T, B, peaks["copy_gbps"])
    if "host" in args.parts:
        for T in args.lengths:
            rows += host_profile(T)
    if {"model", "static", "generate"} & set(args.parts):
        model = build_model()
        for L in args.lengths:
            if "model" in args.parts:
                rows += model_decode(model, L, args.variants, args.reps)
            if "static" in args.parts:
                rows += static_decode(model, L, args.static_variants, args.reps)
            if "generate" in args.parts:
                rows += generate_decode(model, L, args.generate_variants, args.new_tokens, min(args.reps, 3))
    save_result(args.out, rows, peaks=peaks)


if __name__ == "__main__":
    main()
