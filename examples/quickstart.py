"""Quickstart: compile an unmodified HF GlmMoeDsa with an IndexCache plan and check it (CPU, < 1 min).

    python examples/quickstart.py [--plan FSSF] [--lowering eager|inductor]
"""

import argparse
import time

import torch
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

import ic_compile

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
            index_topk=8, index_head_dim=16, index_n_heads=4, first_k_dense_replace=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="FSSF")
    parser.add_argument("--lowering", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--seq", type=int, default=48)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**TINY)).eval()  # every layer keeps its indexer
    ids = torch.randint(0, TINY["vocab_size"], (1, args.seq))

    print(ic_compile.explain(model, {"input_ids": ids, "use_cache": False}, plan=args.plan), "\n")

    start = time.perf_counter()
    fast = torch.compile(model, backend="indexcache", options={"plan": args.plan, "lowering": args.lowering})
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
    print(f"compiled with plan {args.plan} ({args.lowering}) and ran in {time.perf_counter() - start:.1f} s")

    # the oracle: HF's own IndexCache, same weights, built with index_topk_pattern=plan
    native = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**TINY, index_topk_pattern=args.plan)).eval()
    loaded = native.load_state_dict(model.state_dict(), strict=False)  # S layers have no indexer weights...
    assert not loaded.missing_keys, loaded.missing_keys  # ...but every tensor the oracle has is the model's
    with torch.no_grad():
        want = native(ids, use_cache=False).logits
        full = model(ids, use_cache=False).logits
    diff = (got - want).abs().max().item()
    print(f"max |logits - HF index_topk_pattern={args.plan!r}| = {diff:.2e}   "
          f"(vs all-F model: {(full - want).abs().max().item():.2e})")
    if diff > 1e-4:
        raise SystemExit("MISMATCH")
    print("deploy:", ic_compile.LayerPlan.from_pattern(args.plan).to_hf_overrides())


if __name__ == "__main__":
    main()
