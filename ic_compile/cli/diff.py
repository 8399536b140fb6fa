"""`ic diff`: the per-layer graph diff of the rewrite (ic_compile.tools.graph_diff)."""

from __future__ import annotations

from ..outputs import output_file
from ..tools.graph_diff import DIFF_STAGES, graph_diff
from ..tools.models import load_model
from .arguments import (add_cache_argument, add_model_arguments, example_ids, examples, forward_inputs, positive_int,
                        print_json)
from .progress import Stages


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "diff", help="per-layer graph diff of the rewrite: removed nodes, FLOPs, bytes",
        description="Apply --plan to the model's Dynamo graph and count, per indexer layer, the nodes "
                    "removed / rewired and the indexer FLOPs, weights and key-cache bytes that no longer run.",
        epilog=examples("ic diff --model dsa:tiny --plan FSSF --seq 24 --seq-len 1024",
                        "ic diff --model hf-tiny:deepseek_v32 --plan FSFS --json > diff.json",
                        "ic diff --model hf-tiny:glm_moe_dsa --plan FSFS --html diff.html"))
    add_model_arguments(parser)
    parser.add_argument("--plan", required=True, help="pattern (FSSF...) or plan.json")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="sequence length the FLOPs are counted at (default: --seq)")
    parser.add_argument("--kernels", action="store_true",
                        help="also lower F indexers to ic::indexer_topk (as the backend does on CUDA)")
    add_cache_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the diff as JSON")
    parser.add_argument("--html", default=None, help="write the interactive graph page here (checked first)")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    if args.html:
        output_file(args.html, "--html")
    names = ["load model"] + DIFF_STAGES + (["write HTML"] if args.html else [])
    with Stages(names, "ic diff") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed)
            inputs = forward_inputs(model, example_ids(model, args), args.with_cache)
        diff = graph_diff(model, inputs, plan=args.plan, seq_len=args.seq_len, kernels=args.kernels,
                          progress=stages)
        if args.html:
            with stages.step("write HTML"):
                diff.to_html(args.html)
    print_json(diff.to_dict()) if args.json else print(diff)
    if args.html and not args.json:
        print(f"wrote {args.html}")
    return 0
