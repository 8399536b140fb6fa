"""CPU timing: how much of the indexer work a plan removes (FSSS vs FFFF) on an indexer-heavy model.

    python bench/cpu_shared_ratio.py [--seq 1024] [--layers 8] [--plan FSSSFSSS]

Indexer-heavy config: many indexer heads, small model dims, long sequence, so the O(L^2) indexer
dominates. Prints measured time ratio next to the FLOP ratio counted from the config.
"""

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import torch

from ic_compile import dsa_model


def counted_flops(dsa, args, ids, plan):
    """FLOPs of one forward of the model built natively with `plan` (same work as the rewrite)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = dsa.init_weights(dsa.Transformer(dataclasses.replace(args, index_topk_pattern=plan)), 0).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


def time_plan(model, ids, plan, repeats):
    fast = torch.compile(model, backend="indexcache", options={"plan": plan, "lowering": "inductor"})
    with torch.no_grad():
        fast(ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fast(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--plan", default=None, help="default: F then S for the rest")
    parser.add_argument("--repeats", type=int, default=5)
    result_file = pathlib.Path(__file__).resolve().parent / "results" / "cpu_shared_ratio.json"
    parser.add_argument("--out", default=str(result_file),
                        help="JSON report, overwritten (default: %(default)s; '' = print only)")
    cli = parser.parse_args()
    dsa = dsa_model
    args = dsa.ModelArgs.tiny(n_layers=cli.layers, index_n_heads=32, index_head_dim=64, index_topk=32,
                              max_seq_len=cli.seq, n_routed_experts=2, n_activated_experts=1)
    model = dsa.init_weights(dsa.Transformer(args), 0).eval()
    ids = torch.randint(0, args.vocab_size, (1, cli.seq))
    shared = cli.plan or "F" + "S" * (cli.layers - 1)
    full = "F" * cli.layers
    t_full = time_plan(model, ids, full, cli.repeats)
    torch._dynamo.reset()
    t_shared = time_plan(model, ids, shared, cli.repeats)
    result = {"seq": cli.seq, "layers": cli.layers, "plan": shared, "threads": torch.get_num_threads(),
              "time_full_s": t_full, "time_shared_s": t_shared, "time_ratio": t_shared / t_full,
              "flop_ratio": counted_flops(dsa, args, ids, shared) / counted_flops(dsa, args, ids, full)}
    print(json.dumps(result, indent=2))
    if cli.out:
        open(cli.out, "w").write(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
