"""One topk_select call on the last query chunk's real score buffer, for a profiler.

    ncu --clock-control none -k regex:topk_ --launch-skip 3 --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python bench/profile_select.py 16384

Builds the indexer scores of random inputs (30B indexer shape, prefill S = T = L), then calls
topk_select (unordered, the launch config indexer_topk._SELECT_TUNING) twice: the first call
compiles, the second is the one to profile (three launches: filter, exact, resolve kernels).
Prints the wall time of a third.
"""
import sys
import time

import torch

# the launch config is private (topk_select's _Tuning): this bench script imports the indexer's own
from ic_compile.kernels.indexer_topk import _SELECT_TUNING, chunked_scores
from ic_compile.kernels.topk_select import topk_select

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_speed import indexer_inputs  # noqa: E402  (bench/kernel_speed.py)


def main(L: int) -> None:
    torch.manual_seed(0)
    q, k, w = indexer_inputs(1, L, L, 32, 128, torch.device("cuda"))
    for s0, _, last in chunked_scores(q, k, w):
        pass
    scores = last[0]  # [rows, width] fp32
    launch = _SELECT_TUNING
    for _ in range(2):
        topk_select(scores, 2048, diag_base=s0, sorted=False, _tuning=launch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    topk_select(scores, 2048, diag_base=s0, sorted=False, _tuning=launch)
    torch.cuda.synchronize()
    print(f"L={L} rows={scores.shape[0]} width={scores.shape[1]} {launch}: "
          f"{(time.perf_counter() - t0) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
