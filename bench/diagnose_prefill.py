"""Where does ours-* prefill time go? Graph count, per-call times, top CUDA ops (profiler)."""

import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from prefill import CONFIG, build_model  # noqa: E402

import ic_compile.backend as backend  # noqa: E402

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
model = build_model()
ids = torch.randint(0, CONFIG["vocab_size"], (1, L), device="cuda")
for kernels in (True, False):
    torch._dynamo.reset()
    backend.last_results.clear()
    fn = torch.compile(model, backend="indexcache", options={"plan": "FS", "lowering": "eager", "kernels": kernels})
    with torch.no_grad():
        for i in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            print(f"kernels={kernels} call {i}: {(time.perf_counter() - start) * 1e3:.1f} ms, "
                  f"graphs so far {len(backend.last_results)}", flush=True)
        print([(len(r.detection.matches), r.kernels.lowered, r.kernels.skipped) for r in backend.last_results])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
