"""The paper's setting on one GPU: the whole 47-layer GLM-4.7-Flash-shaped model (30B, bf16, random weights).

    python bench/e2e.py --part prefill --length 200000 --plans F 1/4 1/8   # -> bench/results/e2e.json
    python bench/e2e.py --part decode --length 200000 --plans F 1/4
    python bench/e2e.py --part prefill --length 200000 --plans F:fp8 1/4:fp8   # the fp8 indexer
    python bench/e2e.py --part decode --length 200000 --plans 1/4 --option moe_experts=false  # HF's experts
    python bench/e2e.py --part decode --length 200000 --plans F 1/4 --without lone_linears 1/4  # A/B
    python bench/e2e.py --part decode --length 200000 --plans F 1/4 --with pdl F 1/4  # A/B, a feature off by default
    python bench/e2e.py --part prefill --length 200000 --plans 1/4 --layers 8 --profile  # time per kernel

Plans: "F" (every layer keeps its indexer), "1/4" and "1/8" (uniform: layer i keeps it when i % 4 == 0,
resp. i % 8 == 0 — 12 and 6 of 47 layers); a ":fp8" suffix runs the F layers' indexer in fp8
(options={"indexer_precision": "fp8"}: what the paper's SGLang stack runs). Every variant is ours with
Inductor lowering.
  * prefill: last-token logits of one L-token sequence, no cache. The first call's wall time (Dynamo
    trace + rewrite + Inductor compile + one run) is reported as compile_s; then `--reps` timed runs.
  * decode: one new token at position L of a StaticCache (ic_compile.static_cache) whose tensors
    (latent KV, indexer keys) are filled with random values, rewound to L before every step, with
    options={"cudagraphs": True}: what a serving engine replays. tokens/s = 1000 / step ms, two ways:
    `ms` times each step alone (CUDA events, synchronised after it: one token's latency, the host's
    work before the graph launch included — Dynamo's guards, the CUDA-graph tree's checks, the
    rewind); `ms_pipelined` issues `--reps` steps back to back and synchronises once (what an engine
    whose host schedules the next step while the GPU runs this one sees: SGLang's overlap scheduler,
    vLLM's async scheduling; the host's time per step is `host_ms`, hidden while below the GPU's).
    Each row also holds the step's kernel profile (bench/decode.py kernel_profile: summed GPU time, launches,
    top kernels), so the time that is not the indexer can be read by kernel.
  * --regional (prefill): `layer.compile(...)` on each decoder layer instead of the whole model (the
    backend binds each layer's frame as a fragment; S layers read their F layer's top-k from the index
    store). Dynamo traces 47 small frames instead of one large one and Inductor's cache serves the
    identical ones: a shorter first call (2.1× on CPU at 32 layers, bench/regional_compile.py), at the
    price of Python between layers. Rows say which ("regional": true). Not at 200K: HF builds the
    causal mask eagerly outside the layers, a [L, L] bool (37.25 GiB at 200K, out of memory on an
    H100), which the whole-model graph never materialises.
Rows are merged into the results file by (part, L, plan, layers, regional, --option values, --without /
--with feature), so the parts can run in separate calls.
The bf16 limit of a prefill = its counted FLOPs (bench/prefill.py's work_flops) / the in-run matmul peak.
"""

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decode import kernel_profile, rewind  # noqa: E402
from prefill import CONFIG, bf16_peak_tflops, build_model, save_result, time_ms, work_flops  # noqa: E402

import ic_compile  # noqa: E402
from ic_compile import backend  # noqa: E402
from ic_compile.kernels import _triton_utils  # noqa: E402
from ic_compile.passes import fold_moe_route, fold_rms_norm, lower_decode_linears, realize_rotary_table  # noqa: E402
from ic_compile.plan import LayerPlan  # noqa: E402

LAYERS = 47  # GLM-4.7-Flash: 47 decoder layers, the first dense, then 64-expert MoE
RESULT = pathlib.Path(__file__).resolve().parent / "results" / "e2e.json"
LONE_MAX_BYTES = lower_decode_linears._LONE_MAX_BYTES
REALIZE_OP = realize_rotary_table._realize_op
FOLDS = {"rms_norm_prologue": (fold_rms_norm, "_FOLDS"), "norm_side_outputs": (fold_rms_norm, "_SIDE_OUTPUTS"),
         "route_in_experts": (fold_moe_route, "_FOLDS")}  # -> switch
FOLDS_ON = {feature: getattr(*switch) for feature, switch in FOLDS.items()}
KERNEL_PDL, PDL_PREFETCH, INDUCTOR_PDL = _triton_utils._PDL, _triton_utils._PDL_PREFETCH, backend._INDUCTOR_PDL
INDUCTOR_COMBO = backend._INDUCTOR_COMBO


def pattern(plan: str, layers: int = LAYERS) -> str:
    """"F" -> all F; "1/n" -> F every n-th layer from layer 0 (HF index_topk_freq n, offset 1);
    a ":precision" suffix is ignored here."""
    spec = plan.split(":")[0]
    every = 1 if spec == "F" else int(spec.split("/")[1])
    return LayerPlan.from_freq(layers, every, offset=1).pattern


def precision(plan: str) -> str:
    """"1/4:fp8" -> "fp8"; no suffix -> "bf16"."""
    return plan.split(":")[1] if ":" in plan else "bf16"


def compiled(model, plan: str, layers: int, graphs: bool = False, regional: bool = False, extra: dict | None = None):
    torch._dynamo.reset()
    options = {"plan": pattern(plan, layers), "lowering": "inductor", "cudagraphs": graphs,
               "indexer_precision": precision(plan), **(extra or {})}
    for layer in model.model.layers:
        layer.__dict__.pop("_compiled_call_impl", None)  # undo an earlier variant's regional compile
        if regional:
            layer.compile(backend="indexcache", options=options)
    return model if regional else torch.compile(model, backend="indexcache", options=options)


def prefill_row(model, plan: str, L: int, layers: int, reps: int, peak: float, regional: bool, extra: dict,
                profile: bool = False) -> dict:
    ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
    fn = compiled(model, plan, layers, regional=regional, extra=extra)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        start = time.perf_counter()
        fn(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = time_ms(lambda: fn(ids, use_cache=False, logits_to_keep=1), reps)
    limit_ms = work_flops(L, pattern(plan, layers)) / (peak * 1e12) * 1e3
    row = {"part": "prefill", "L": L, "plan": plan, "layers": layers, "regional": regional, "ms": ms,
           "compile_s": compile_s,
           "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "limit_ms": limit_ms,
           "pct_of_limit": 100 * limit_ms / ms}
    if profile:  # one more run under the profiler: GPU time per kernel, summed over the layers
        row.update(kernel_profile(lambda: fn(ids, use_cache=False, logits_to_keep=1), 1, top=30))
    return row


def random_static_cache(model, L: int):
    """A StaticCache of L + 8 slots, every floating tensor random, each layer's length at L."""
    cache = ic_compile.static_cache(model, 1, L + 8)
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.normal_()
    return cache


def decode_row(model, cache, plan: str, L: int, layers: int, reps: int, extra: dict) -> dict:
    fn = compiled(model, plan, layers, graphs=True, extra=extra)
    token = torch.randint(0, CONFIG["vocab_size"], (1, 1), device="cuda")
    position = torch.tensor([L], device="cuda")

    def step():
        rewind(cache, L)
        torch.compiler.cudagraph_mark_step_begin()
        fn(token, past_key_values=cache, use_cache=True, cache_position=position)

    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(3):  # compile, record the CUDA graph, first replay
            step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        ms = time_ms(step, reps)
        pipelined, host_ms = pipelined_ms(step, reps)
    return {"part": "decode", "L": L, "plan": plan, "layers": layers, "ms": ms, "tokens_per_s": 1000 / ms,
            "ms_pipelined": pipelined, "tokens_per_s_pipelined": 1000 / pipelined, "host_ms": host_ms,
            "compile_s": compile_s, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            **kernel_profile(step, reps, top=80)}


def switch(without: str | None = None, with_: str | None = None) -> None:
    """The passes' and kernels' private knobs for one row: every default, then `without` (a feature on
    by default) off or `with_` (one off by default) on.
    Without: "lone_linears": the decode graphs' lone one-token linears stay cuBLAS's (the size limit 0);
    "rotary_table": the rotary cos / sin stay fused into every layer's RoPE kernel (no realize op);
    "rms_norm_prologue": the norms read by one multi_linear stay Inductor's kernels (fold_rms_norm off);
    "norm_side_outputs": a norm with other readers (post_attention_layernorm: the router and the experts)
    stays Inductor's, the residual sums recomputed by Inductor (fold_rms_norm without side outputs);
    "route_in_experts": the router's tail stays its own launch (fold_moe_route off).
    With: "pdl": programmatic dependent launch for our decode kernels (their weights prefetched into L2
    before the grid wait) and for Inductor's in the captured graphs; "kernel_pdl": for ours alone;
    "kernel_pdl_no_prefetch": ours alone, without the L2 prefetch; "combo_kernels": Inductor's combo kernels
    in the captured graphs (independent kernels in one launch)."""
    lower_decode_linears._LONE_MAX_BYTES = 0 if without == "lone_linears" else LONE_MAX_BYTES
    realize_rotary_table._realize_op = (lambda: None) if without == "rotary_table" else REALIZE_OP
    for feature, (module, name) in FOLDS.items():
        setattr(module, name, without != feature and FOLDS_ON[feature])
    _triton_utils._PDL = with_ in ("pdl", "kernel_pdl", "kernel_pdl_no_prefetch") or KERNEL_PDL
    _triton_utils._PDL_PREFETCH = with_ != "kernel_pdl_no_prefetch" and PDL_PREFETCH
    backend._INDUCTOR_PDL = with_ == "pdl" or INDUCTOR_PDL
    backend._INDUCTOR_COMBO = with_ == "combo_kernels" or INDUCTOR_COMBO


FEATURES = ("lone_linears", "rotary_table", *FOLDS)  # on by default: --without
OFF_FEATURES = ("pdl", "kernel_pdl", "kernel_pdl_no_prefetch", "combo_kernels")  # off by default: --with


def pipelined_ms(step, steps: int) -> tuple[float, float]:
    """(GPU ms per step, host ms per step) of `steps` steps issued back to back, one synchronisation at
    the end: the host's work for a step overlaps the GPU's for the one before."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host_start = time.perf_counter()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    host_ms = (time.perf_counter() - host_start) * 1e3 / steps
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps, host_ms


def merged(out: pathlib.Path, rows: list[dict]) -> list[dict]:
    """Earlier rows of the results file, those with the same (part, L, plan, layers, regional, options,
    without, with) replaced."""
    key = lambda row: (row["part"], row["L"], row["plan"], row["layers"], row.get("regional", False),  # noqa: E731
                       json.dumps(row.get("options", {}), sort_keys=True), row.get("without"), row.get("with"))
    old = json.loads(out.read_text())["rows"] if out.exists() else []
    new = {key(row) for row in rows}
    return [row for row in old if key(row) not in new] + rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["prefill", "decode"], required=True)
    parser.add_argument("--length", type=int, default=200000)
    parser.add_argument("--plans", nargs="*", default=["F", "1/4"], help="none: only the --with / --without rows")
    parser.add_argument("--layers", type=int, default=LAYERS, help="fewer for a quick check")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--regional", action="store_true", help="prefill: compile each decoder layer")
    parser.add_argument("--profile", action="store_true",
                        help="prefill: one more run under torch.profiler; the row gets gpu_ms, launches, top_kernels")
    parser.add_argument("--out", default=str(RESULT), help="JSON results file, rows merged (default: %(default)s)")
    parser.add_argument("--without", nargs="+", action="append", default=[], metavar=("FEATURE", "PLAN"),
                        help=f"A/B: the plans after FEATURE ({', '.join(FEATURES)}) again with that pass feature "
                             "off (rows say without: FEATURE); repeatable")
    parser.add_argument("--with", dest="with_", nargs="+", action="append", default=[], metavar=("FEATURE", "PLAN"),
                        help=f"A/B: the plans after FEATURE ({', '.join(OFF_FEATURES)}) again with that feature, "
                             "off by default, on (rows say with: FEATURE); repeatable")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                        help="another backend option for every row, e.g. moe_experts=false (rows keyed by them)")
    args = parser.parse_args()
    bad = [feature for feature, *_ in args.without if feature not in FEATURES]
    if bad:
        parser.error(f"--without {bad}: features are {FEATURES}")
    bad = [feature for feature, *_ in args.with_ if feature not in OFF_FEATURES]
    if bad:
        parser.error(f"--with {bad}: features are {OFF_FEATURES}")
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.option)}
    peak = bf16_peak_tflops()
    model = build_model(args.layers)
    cache = random_static_cache(model, args.length) if args.part == "decode" else None
    rows = []
    variants = ([(plan, None, None) for plan in args.plans]
                + [(plan, feature, None) for feature, *plans in args.without for plan in plans]
                + [(plan, None, feature) for feature, *plans in args.with_ for plan in plans])
    for plan, without, with_ in variants:
        switch(without, with_)
        try:
            if args.part == "prefill":
                row = prefill_row(model, plan, args.length, args.layers, args.reps, peak, args.regional, extra,
                                  args.profile)
            else:
                row = decode_row(model, cache, plan, args.length, args.layers, args.reps, extra)
        except torch.OutOfMemoryError as exc:
            row = {"part": args.part, "L": args.length, "plan": plan, "layers": args.layers,
                   "regional": args.regional, "oom": str(exc)[:200]}
        row["options"], row["command"] = extra, " ".join(sys.argv)
        if without:
            row["without"] = without
        if with_:
            row["with"] = with_
        rows.append(row)
        print(json.dumps(row), flush=True)
        # saved after every row: a run cut at a time limit (each plan compiles for minutes) keeps its rows
        out = pathlib.Path(args.out)
        save_result(str(out), merged(out, rows), bf16_peak_tflops=peak,
                    versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__})


if __name__ == "__main__":
    main()
