"""Whole-model vs regional compilation (torch.compile on each decoder layer) with a plan: compile time
and exactness, on CPU (compile time is host work), HF GlmMoeDsa with N layers.

    for v in whole regional; do TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/regional_compile.py \
        --layers 16 --variants $v; done                                  # prints JSON per variant

Regional: `layer.compile(backend="indexcache", options=...)` on every decoder layer; each layer's frame
holds one indexer, so the backend binds it as a graph fragment and S layers read their F layer's
top-k from the index store. The oracle is HF's own IndexCache model (`indexer_types`) with the same weights.
"""

import argparse
import json
import time

import torch
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
            index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=1)


def model(layers: int, pattern: str | None = None):
    torch.manual_seed(0)
    extra = {} if pattern is None else {"index_topk_pattern": pattern}
    return GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**TINY, num_hidden_layers=layers, **extra)).eval()


def first_call_s(fn, ids) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        logits = fn(ids).logits
    return time.perf_counter() - start, logits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--plan-every", type=int, default=4)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--variants", nargs="+", default=["whole", "regional"], choices=["whole", "regional"],
                        help="one per process with a fresh TORCHINDUCTOR_CACHE_DIR for compile times "
                             "that no earlier compile's cache helps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = "".join("F" if i % args.plan_every == 0 else "S" for i in range(args.layers))
    options = {"plan": plan, "lowering": args.lowering}
    ids = torch.randint(0, TINY["vocab_size"], (1, args.seq))
    native = model(args.layers, plan)  # HF's own IndexCache model: S layers have no indexer weights
    missing, _ = native.load_state_dict(model(args.layers).state_dict(), strict=False)
    assert not missing, missing
    with torch.no_grad():
        want = native(ids).logits
    rows = {}
    for variant in args.variants:
        torch._dynamo.reset()
        net = model(args.layers)
        if variant == "whole":
            net = torch.compile(net, backend="indexcache", options=options)
        else:
            for layer in net.model.layers:
                layer.compile(backend="indexcache", options=options)
        rows[variant] = first_call_s(net, ids)
    print(json.dumps({"layers": args.layers, "plan": plan, "lowering": args.lowering, "seq": args.seq,
                      **{f"{k}_first_call_s": round(v[0], 2) for k, v in rows.items()},
                      **{f"{k}_max_abs_diff_vs_native": float((v[1] - want).abs().max()) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
