"""Training-aware IndexCache in a few lines: fine-tune the reference model with a plan applied and the
multi-layer distillation loss (ic_compile.training), then compare the plan's loss before and after.

    python examples/distill_example.py [--plan FSSSFSSS] [--steps 30]

Random tokens stand in for data here; examples/train_dsa.py is the real recipe.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ic_compile.models import import_examples_module  # noqa: E402
from ic_compile.search import evaluate_plan  # noqa: E402
from ic_compile.training import collect_distillation_inputs, multi_layer_distillation_loss  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--plan", default="FSSSFSSS")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dsa = import_examples_module("dsa_model")
    model = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny(n_layers=len(args.plan))), seed=0)
    gen = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 256, (4, args.seq), generator=gen)
    before = evaluate_plan(model, held_out, args.plan, objective="kl")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        ids = torch.randint(0, 256, (4, args.seq), generator=gen)
        inputs = collect_distillation_inputs(model, ids, args.plan, dense=False)
        distill = multi_layer_distillation_loss(inputs.indexer_scores, inputs.attention_probs, args.plan,
                                                topk_indices=inputs.topk_indices)
        lm = F.cross_entropy(inputs.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (lm + distill).backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: lm {lm.item():.4f}  distill {distill.item():.5f}")
    model.eval()
    after = evaluate_plan(model, held_out, args.plan, objective="kl")
    print(f"plan {args.plan}: KL(all-F || plan) on held-out tokens {before:.5f} before, {after:.5f} after")


if __name__ == "__main__":
    main()
