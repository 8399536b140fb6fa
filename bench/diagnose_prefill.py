"""Where does ours-* prefill time go? Per-call times and the top CUDA ops (profiler), per option set.

    python bench/diagnose_prefill.py 16384 --plan FF --sparse-attention both --rows 25
    python bench/diagnose_prefill.py 16384 --plan FF --sparse-attention on --lowering inductor --out prof.txt
"""

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from prefill import CONFIG, build_model  # noqa: E402

import ic_compile.backend as backend  # noqa: E402


def profile(model, ids, options, rows, out):
    torch._dynamo.reset()
    backend.last_results.clear()
    fn = torch.compile(model, backend="indexcache", options=options)
    with torch.no_grad():
        for i in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            print(f"{json.dumps(options)} call {i}: {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
        print([(len(r.detection.matches), r.kernels.lowered, r.kernels.skipped) for r in backend.last_results])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    print(table, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(f"{json.dumps(options)}\n{table}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("length", type=int, nargs="?", default=4096)
    ap.add_argument("--plan", default="FS")
    ap.add_argument("--sparse-attention", choices=("on", "off", "both"), default="both")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--lowering", choices=("eager", "inductor"), default="eager")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "diagnose_prefill.txt"),
                    help="the run's profile tables, overwritten (default: %(default)s; '' = print only)")
    args = ap.parse_args()
    if args.out:
        open(args.out, "w").close()  # one run per file: each profile() call appends its table
    model = build_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.length), device="cuda")
    choices = {"on": [True], "off": [False], "both": [False, True]}[args.sparse_attention]
    for sparse_attention in choices:
        profile(model, ids, {"plan": args.plan, "lowering": args.lowering, "sparse_attention": sparse_attention},
                args.rows, args.out)


if __name__ == "__main__":
    main()
