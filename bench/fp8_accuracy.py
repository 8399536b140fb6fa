"""What the fp8 indexer costs in accuracy on a trained model (examples/train_dsa.py's reference DSA model).

    python examples/train_dsa.py --tiny --seq 512 --topk 64 --dim 96 --out runs/fp8   # or any checkpoint
    python bench/fp8_accuracy.py --ckpt runs/fp8                # -> bench/results/fp8_accuracy.json

On held-out Python source (the stdlib files train_dsa.py never trains on):
  * top-k recall, per layer: each indexer's inputs are taken by a forward hook; its top-k is selected
    again by our op `ic::indexer_topk` with indexer_precision "fp8" (DeepSeek-V3.2's fp8_index: q, k
    in e4m3 with per-token scales) and with the model's own precision; recall = |fp8 set ∩ own set| /
    K over the query rows that have more than K causal keys (shorter rows select every key). The
    own-precision op is checked against the module's own output (its recall is reported too: ~1.0
    up to ties).
  * LM loss: the held-out loss through the indexcache backend (kernels=True, eager lowering: the
    ops' references on CPU, the same maths as the GPU kernels up to accumulation order), all-F and
    the uniform 1/4 plan, with indexer_precision "bf16" (the model's own) and "fp8".
"""

import argparse
import json
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from train_dsa import load_corpus, lm_loss, windows  # noqa: E402  (examples/train_dsa.py)

import ic_compile  # noqa: E402,F401  (registers the backend)
import ic_compile.kernels.ops  # noqa: E402,F401  (registers torch.ops.ic)
from ic_compile.plan import LayerPlan  # noqa: E402
from ic_compile.tools.models import load_checkpoint  # noqa: E402

RESULT = pathlib.Path(__file__).resolve().parent / "results" / "fp8_accuracy.json"


def indexer_inputs(indexer, x, q_latent, cos, sin):
    """The reference Indexer's q [B,S,H,D], k [B,T,D] and head weights [B,S,H] (every positive
    factor of its scores folded in: they do not change the selection, only the scale)."""
    B, S, _ = x.shape
    q = indexer.rope(indexer.wq_b(q_latent).view(B, S, indexer.n_heads, indexer.head_dim), cos, sin)
    k = indexer.rope(indexer.k_norm(indexer.wk(x)), cos, sin)
    w = indexer.weights_proj(x).float() * indexer.n_heads ** -0.5 * indexer.softmax_scale
    return q, k, w


def row_recall(got: torch.Tensor, want: torch.Tensor, first_row: int) -> float:
    """Mean |got ∩ want| / K over query rows s >= first_row; got, want [B,S,K] key ids."""
    got, want = got[:, first_row:].long(), want[:, first_row:].long()
    hits = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).sum(-1)  # [B,S']
    return float((hits.float() / want.shape[-1]).mean())


def recall_per_layer(model, batches: list[torch.Tensor]) -> list[dict]:
    indexers = [layer.attn.indexer for layer in model.layers]
    sums = [{"fp8_vs_own": 0.0, "own_op_vs_module": 0.0} for _ in indexers]

    def hook(i):
        def measure(module, args, output):
            x, q_latent, cos, sin = args[:4]
            q, k, w = indexer_inputs(module, x, q_latent, cos, sin)
            K = output.shape[-1]
            select = lambda precision: torch.ops.ic.indexer_topk(q, k, w, K, None, True, False, None, True,  # noqa: E731
                                                                 precision)
            own = select("bf16")  # "bf16" = the inputs' own precision (fp32 here)
            sums[i]["fp8_vs_own"] += row_recall(select("fp8"), own, K)
            sums[i]["own_op_vs_module"] += row_recall(own, output, K)
        return measure

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(indexers)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(ids)
    finally:
        for h in handles:
            h.remove()
    return [{key: round(value / len(batches), 5) for key, value in s.items()} for s in sums]


def heldout_loss(model, batches: list[torch.Tensor], plan: str, precision: str) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="indexcache", options={
        "plan": plan, "kernels": True, "lowering": "eager", "indexer_precision": precision})
    with torch.no_grad():
        return sum(float(lm_loss(compiled(ids), ids)) for ids in batches) / len(batches)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True, help="a train_dsa.py checkpoint directory")
    parser.add_argument("--sequences", type=int, default=32, help="held-out windows of the model's training length")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-files", type=int, default=400, help="stdlib files read (held-out: crc32 % 10 == 0)")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_checkpoint(args.ckpt).eval()
    config = json.loads((pathlib.Path(args.ckpt) / "config.json").read_text())
    seq = config["recipe"]["seq"]
    corpus, _ = load_corpus(args.max_files)
    ids = windows(corpus["code"]["heldout"], seq, args.sequences)
    batches = list(ids.split(args.batch))
    n = len(model.layers)
    quarter = LayerPlan.from_freq(n, 4, offset=1).pattern
    report = {"checkpoint": {"model_args": config["model_args"], "recipe_seq": seq},
              "heldout_tokens": ids.numel(), "recall": recall_per_layer(model, batches), "loss": {}}
    for plan in ("F" * n, quarter):
        for precision in ("bf16", "fp8"):
            report["loss"][f"{plan}:{precision}"] = round(heldout_loss(model, batches, plan, precision), 5)
            print(plan, precision, report["loss"][f"{plan}:{precision}"], flush=True)
    for plan in ("F" * n, quarter):
        own, fp8 = report["loss"][f"{plan}:bf16"], report["loss"][f"{plan}:fp8"]
        report["loss"][f"{plan}:fp8_change_pct"] = round(100 * (fp8 - own) / own, 4)
    report["command"] = " ".join(sys.argv)
    print(json.dumps(report, indent=1))
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
