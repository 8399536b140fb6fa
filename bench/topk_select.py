"""Top-k selection on real indexer score buffers: torch.topk vs the radix-select kernel.

For each L, the score buffer of the indexer's last query chunk (fp32 [1, rows, L], -inf above
the causal diagonal; the widest chunk) is built with the real score kernel, then each selector
is timed on it and checked against the buffer (kernels.testing.check_topk). `gbps_one_pass` is
the causal part of the buffer (bytes a selector must read at least once) over the time.

    python bench/topk_select.py --out bench/results/topk_select_h200.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch

from ic_compile.kernels.indexer_topk import chunked_scores
from ic_compile.kernels.reference import topk_indices_from_scores
from ic_compile.kernels.testing import check_topk
from ic_compile.kernels.topk_select import topk_select_triton

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernels import bench_ms, indexer_inputs, measure_peaks  # noqa: E402  (bench/kernels.py)

CONFIGS = [dict(digit_bits=b, num_warps=w, block=blk) for b in (8, 11) for w in (4, 8, 16) for blk in (1024, 2048)]


def last_chunk(L: int, H: int, D: int, device) -> tuple[torch.Tensor, int]:
    """(scores of the last query chunk [1, rows, L], limit_base of its first row)."""
    q, k, w = indexer_inputs(1, L, L, H, D, device)
    for s0, s1, scores in chunked_scores(q, k, w):
        pass
    return scores.clone(), s0 + 1  # S = T = L: row s sees keys [0, s + 1)


def bench_length(L, H, D, topk, peaks, quick) -> list[dict]:
    device = torch.device("cuda")
    scores, limit_base = last_chunk(L, H, D, device)
    rows = scores.shape[1]
    causal_bytes = 4 * sum(min(L, limit_base + r) for r in range(rows))
    runs = [("torch.topk", lambda: topk_indices_from_scores(scores, topk), None)]
    for cfg in CONFIGS:
        runs.append((f"radix bits={cfg['digit_bits']} warps={cfg['num_warps']} block={cfg['block']}",
                     lambda cfg=cfg: topk_select_triton(scores, topk, limit_base, **cfg), cfg))
    out = []
    for name, fn, cfg in runs:
        entry = {"L": L, "rows": rows, "selector": name, **(cfg or {})}
        try:
            check_topk(fn(), scores, topk)
            ms = bench_ms(fn, device, quick)
            entry.update(ms=ms, gbps_one_pass=causal_bytes / ms / 1e6,
                         pct_copy_bw_one_pass=100 * causal_bytes / ms / 1e6 / peaks["copy_gbps"])
        except Exception as e:  # noqa: BLE001 - keep going (e.g. too many registers)
            entry["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)
        out.append(entry)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,131072")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="topk_select.json")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    peaks = measure_peaks(device, smoke=False, quick=True)
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": vars(args), "peaks": peaks, "results": []}
    for L in (int(x) for x in args.lengths.split(",")):
        report["results"] += bench_length(L, 32, 128, args.topk, peaks, args.quick)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
