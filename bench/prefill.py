"""End-to-end prefill on the H200: 2 layers of the paper's 30B shape as HF GlmMoeDsa (bf16).

    python bench/prefill.py --lengths 4096 16384 32768 65536 131072   # -> bench/results/prefill.json

Variants: HF eager; torch.compile default (inductor); ours all-F ("FF") and FS, with our fused indexer
op and absorbed sparse MLA, the rest of the graph run eagerly ("ours-FF-eager") or by Inductor
("ours-FF-inductor").
Time = median of CUDA-event-timed forwards returning last-token logits; peak memory per variant;
the bf16 limit = counted FLOPs of the same work / measured bf16 matmul peak.
"""

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import torch

CONFIG = dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, moe_intermediate_size=1536,
              num_hidden_layers=2, num_attention_heads=20, num_key_value_heads=20, n_routed_experts=64,
              num_experts_per_tok=4, n_shared_experts=1, kv_lora_rank=512, q_lora_rank=768,
              qk_rope_head_dim=64, v_head_dim=256, qk_nope_head_dim=192, index_topk=2048, index_head_dim=128,
              index_n_heads=32, first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=202752)

RESULT = str(pathlib.Path(__file__).resolve().parent / "results" / "prefill.json")  # overwritten by each run


def bf16_peak_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (time_ms(lambda: a @ a, 10) * 1e-3) / 1e12


def time_ms(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def work_flops(L, plan):
    """Causal indexer per F layer + sparse attention + projections/MoE (active params) per layer."""
    c = CONFIG
    indexer = L * L / 2 * c["index_n_heads"] * c["index_head_dim"] * 2
    k = min(c["index_topk"], L)
    attn = L * k * c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]) * 2
    h = c["hidden_size"]
    attn_proj = h * c["q_lora_rank"] + c["q_lora_rank"] * c["num_attention_heads"] * 256 \
        + h * (c["kv_lora_rank"] + 64) + c["kv_lora_rank"] * c["num_attention_heads"] * (192 + 256) \
        + c["num_attention_heads"] * 256 * h
    idx_proj = c["q_lora_rank"] * 32 * 128 + h * 128 + h * 32
    mlp = [3 * h * c["intermediate_size"], 3 * h * c["moe_intermediate_size"] * (c["num_experts_per_tok"] + 1)]
    total = 0
    for layer, role in enumerate(plan):
        total += (indexer + 2 * L * idx_proj if role == "F" else 0) + attn + 2 * L * (attn_proj + mlp[min(layer, 1)])
    return total + 2 * h * c["vocab_size"]  # last-token logits


def build_model(layers: int = CONFIG["num_hidden_layers"]):
    """Built on the GPU in bf16 directly (a float32 copy of the 47-layer model's 30B parameters would
    not fit), random weights."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**{**CONFIG, "num_hidden_layers": layers})).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def variant(model, name):
    torch._dynamo.reset()
    if name == "hf-eager":
        return model
    if name == "compile-default":
        return torch.compile(model)
    _, plan, lowering = name.split("-")  # ours-FS-eager
    return torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": lowering})


def measure(model, name, L, reps):
    ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
    fn = variant(model, name)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            ms = time_ms(lambda: fn(ids, use_cache=False, logits_to_keep=1), reps)
        return {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    except torch.OutOfMemoryError:
        return {"ms": None, "oom": True}
    except Exception as exc:  # record and go on: one variant failing must not lose the rest
        return {"ms": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def save_result(out: str | None, rows: list[dict], **fields) -> None:
    """Write the run's rows to `out` (JSON, overwritten; '' = none) with the card, date, torch version and command."""
    if out:
        result = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                  "torch": torch.__version__, "command": " ".join(sys.argv), **fields, "rows": rows}
        open(out, "w").write(json.dumps(result, indent=2))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--variants", nargs="+",
                        default=["hf-eager", "compile-default", "ours-FF-eager", "ours-FS-eager"])
    parser.add_argument("--max-baseline-len", type=int, default=16384, help="HF/compile-default above OOM")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=RESULT,
                        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    args = parser.parse_args()
    peak = bf16_peak_tflops()
    model = build_model()
    rows = []
    for L in args.lengths:
        for name in args.variants:
            if not name.startswith("ours") and L > args.max_baseline_len:
                continue
            plan = name.split("-")[1] if name.startswith("ours") else "FF"
            row = {"L": L, "variant": name, **measure(model, name, L, args.reps),
                   "limit_ms": work_flops(L, plan) / (peak * 1e12) * 1e3}
            rows.append(row)
            print(json.dumps(row), flush=True)
    save_result(args.out, rows, bf16_peak_tflops=peak)


if __name__ == "__main__":
    main()
