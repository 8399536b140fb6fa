"""`ic search`: greedy plan search on calibration data (ic_compile.tools.search)."""

from __future__ import annotations

from ..outputs import output_dir
from ..tools.calibration import calibration_from_files
from ..tools.evaluators import EVALUATORS, OBJECTIVES
from ..tools.models import load_model, vocab_size
from ..tools.search import search_plan
from .arguments import add_model_arguments, check_data_paths, examples, positive_int
from .progress import Stages, progress_enabled


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="greedy plan search on calibration data",
        description="Greedy training-free search (IndexCache paper): starting from all F, turn the F layer "
                    "whose sharing costs least into S, until the target. Writes plan.json, search.json "
                    "and loss.png into --out.",
        epilog=examples("ic search --model dsa:tiny --data README.md docs/ --num-full 2 --out search_out",
                        "ic search --model ckpt:runs/small --data corpus/ --ratio 0.25 --objective kl --out s",
                        "ic search --model hf:config.json --tokenizer DIR --data texts/ --loss-budget 0.05 --out s"))
    add_model_arguments(parser, seq=256, batch=8, seq_help="calibration sequence length (tokens per row)")
    parser.add_argument("--data", nargs="+", required=True, help="calibration text files or directories")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--num-full", type=positive_int, help="stop at this many F layers")
    target.add_argument("--ratio", type=float, help="stop at this fraction of F layers, in (0, 1]")
    parser.add_argument("--loss-budget", type=float,
                        help="stop before loss > all-F loss + budget (without a target: down to 1 F layer)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="lm_loss",
                        help="lm_loss: next-token cross entropy; kl: KL(all-F || plan), label-free")
    parser.add_argument("--max-sequences", type=positive_int, default=64, help="calibration sequences used")
    parser.add_argument("--tokenizer", help="HF tokenizer name/dir (default: bytes %% vocab)")
    parser.add_argument("--evaluator", choices=EVALUATORS, default="auto",
                        help="graph: rewritten Dynamo graph, any model; prefix: reference model, reruns "
                             "from the changed layer; auto: prefix where it applies")
    parser.add_argument("--device", default="cpu", help="torch device for the model and data")
    parser.add_argument("--out", required=True, help="output directory (created; checked before the search)")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    out = output_dir(args.out)  # before the search: a bad path must not cost its minutes
    check_data_paths(args.data)
    with Stages(["load model", "tokenize"], "search setup") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed).to(args.device)
        with stages.step("tokenize"):
            tokenizer = None
            if args.tokenizer:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            data = calibration_from_files(args.data, args.seq, tokenizer=tokenizer, vocab_size=vocab_size(model),
                                          max_sequences=args.max_sequences)
    result = search_plan(model, data, num_full=args.num_full, ratio=args.ratio, loss_budget=args.loss_budget,
                         objective=args.objective, batch_size=args.batch, evaluator=args.evaluator,
                         progress=progress_enabled())
    result.plan.to_json(out / "plan.json")
    result.to_json(out / "search.json")
    result.plot(out / "loss.png")
    print(f"plan {result.plan.pattern} ({result.plan.num_full}/{len(result.plan)} F), {args.objective} "
          f"{result.loss:.4f} (all F {result.full_loss:.4f}); {result.evaluations} evaluations "
          f"(all F + candidates) in {result.seconds:.1f}s; wrote {out}/plan.json, search.json, loss.png")
    return 0
