"""`ic overlap`: the top-k overlap heatmap between indexer layers (ic_compile.tools.overlap)."""

from __future__ import annotations

import json

import torch

from ..outputs import output_dir
from ..tools.calibration import calibration_from_files
from ..tools.models import load_model, vocab_size
from ..tools.overlap import overlap_report, plot_overlap, topk_overlap
from .arguments import add_model_arguments, check_data_paths, examples, positive_int
from .progress import Stages, progress_enabled


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "overlap", help="top-k overlap heatmap between indexer layers",
        description="Run every indexer (all F) and measure the mean Jaccard overlap of the top-k key sets "
                    "of each pair of layers; writes overlap.json and overlap.png into --out.",
        epilog=examples("ic overlap --model dsa:tiny --out overlap_out",
                        "ic overlap --model ckpt:runs/small --data corpus/ --num-full 2 --out overlap_out"))
    add_model_arguments(parser, seq=256, batch=8, seq_help="sequence length")
    parser.add_argument("--data", nargs="+", help="text files or directories (default: random tokens)")
    parser.add_argument("--max-sequences", type=positive_int, default=32, help="sequences measured")
    parser.add_argument("--num-full", type=positive_int,
                        help="also print overlap / uniform plans with this many F")
    parser.add_argument("--device", default="cpu", help="torch device for the model and data")
    parser.add_argument("--out", required=True,
                        help="output directory (overlap.json, overlap.png; created, checked first)")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    out = output_dir(args.out)  # before the model runs
    if args.data:
        check_data_paths(args.data)
    with Stages(["load model"], "ic overlap") as stages, stages.step("load model"):
        model = load_model(args.model, args.seed).to(args.device)
    if args.data:
        data = calibration_from_files(args.data, args.seq, vocab_size=vocab_size(model),
                                      max_sequences=args.max_sequences)
    else:
        data = torch.randint(0, vocab_size(model), (args.max_sequences, args.seq),
                             generator=torch.Generator().manual_seed(args.seed))
    matrix = topk_overlap(model, data, batch_size=args.batch, progress=progress_enabled())
    report = overlap_report(matrix, args.num_full)
    (out / "overlap.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_overlap(matrix, out / "overlap.png")
    print(f"adjacent-layer mean overlap {report['adjacent_mean']:.3f}; wrote {out}/overlap.json, overlap.png")
    if args.num_full:
        print(f"overlap plan {report['overlap_plan']}  uniform plan {report['uniform_plan']}")
    return 0
