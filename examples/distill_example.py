"""Training-aware IndexCache in a few lines: fine-tune the reference model with a plan applied, once on
the LM loss alone and once on LM + the multi-layer distillation loss (ic_compile.tools.training), from the
same start on the same batches, and compare them on held-out text.

    python examples/distill_example.py [--plan FSSSFSSS] [--steps 30] [--lr 1e-3]

Data: three Python standard-library modules as bytes (a stand-in for a corpus that does not change
with this repository; examples/train_dsa.py is the real recipe). Why two runs and not "before vs after": the model starts from random weights,
whose attention is almost uniform, so every loss that compares attention patterns starts near zero
(nothing to distil yet) and grows as the LM loss makes attention peaked. The distillation loss is what
the extra term optimises; its effect is the gap between the two runs after the same steps, not its
change over training (KL(all-F || plan) on random tokens is neither what it trains nor learnable).
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ic_compile import dsa_model  # noqa: E402
from ic_compile.tools.calibration import calibration_from_files  # noqa: E402
from ic_compile.tools.training import collect_distillation_inputs, multi_layer_distillation_loss  # noqa: E402

VOCAB = 256
# Text that does not change with this repository (its own docs did, and moved the numbers): a few
# modules of the Python standard library, byte-level.
STDLIB_TEXT = [Path(sysconfig.get_paths()["stdlib"]) / name for name in ("argparse.py", "textwrap.py", "json/decoder.py")]


def losses(model, ids, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss, distillation loss) of one forward with the plan applied (sparse stage)."""
    inputs = collect_distillation_inputs(model, ids, plan, dense=False)
    distill = multi_layer_distillation_loss(inputs.indexer_scores, inputs.attention_probs, plan,
                                            topk_indices=inputs.topk_indices)
    lm = F.cross_entropy(inputs.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return lm, distill


@torch.no_grad()
def held_out(model, ids, plan) -> tuple[float, float]:
    model.eval()
    lm, distill = losses(model, ids, plan)
    model.train()
    return lm.item(), distill.item()


def train(model, batches, plan, lr: float, distill_weight: float, name: str):
    """The indexers read detached hidden states: the distillation term trains only them, the LM term
    everything else (top-k selection passes no gradient to the indexer)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step, ids in enumerate(batches):
        lm, distill = losses(model, ids, plan)
        opt.zero_grad()
        (lm + distill_weight * distill).backward()
        opt.step()
        if step % 10 == 0 or step == len(batches) - 1:
            print(f"{name} step {step}: lm {lm.item():.4f}  distill {distill.item():.3g}")
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", default="FSSSFSSS")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dsa = dsa_model
    gen = torch.Generator().manual_seed(0)
    rows = calibration_from_files(STDLIB_TEXT, args.seq)
    rows = rows[torch.randperm(len(rows), generator=gen)]
    held_out_ids, train_rows = rows[:8], rows[8:]
    batches = [train_rows[torch.randint(0, len(train_rows), (4,), generator=gen)] for _ in range(args.steps)]
    results = {}
    for name, weight in (("LM only", 0.0), ("LM + distill", 1.0)):
        model = dsa.init_weights(dsa.Transformer(dsa.ModelArgs.tiny(n_layers=len(args.plan))), seed=0)
        if not results:
            start = held_out(model, held_out_ids, args.plan)
        results[name] = held_out(train(model, batches, args.plan, args.lr, weight, name), held_out_ids, args.plan)
    print(f"\nheld-out text, plan {args.plan}, {args.steps} steps   start     LM only  LM + distill")
    print(f"LM loss (both optimise it)            {start[0]:8.4f} {results['LM only'][0]:10.4f} "
          f"{results['LM + distill'][0]:10.4f}")
    print(f"distillation loss (only the 2nd)      {start[1]:8.2e} {results['LM only'][1]:10.2e} "
          f"{results['LM + distill'][1]:10.2e}")
    print("The distillation loss starts near 0 (random attention is almost uniform) and grows as the LM makes "
          "attention\npeaked; the distillation term keeps it lower than the LM-only run on the same batches.")
    return {"start": start, **results}


if __name__ == "__main__":
    main()
