"""`ic explain`: what the rewrite finds and changes for a plan (ic_compile.tools.explain)."""

from __future__ import annotations

from ..tools.explain import explain
from ..tools.models import load_model
from .arguments import add_cache_argument, add_model_arguments, example_ids, examples, forward_inputs, print_json


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain", help="what the rewrite finds and changes for a plan",
        description="Capture the model's Dynamo graph, detect its lightning indexers and apply --plan: "
                    "prints each indexer layer's role, source and removed nodes.",
        epilog=examples("ic explain --model dsa:tiny --plan FSSF",
                        "ic explain --model hf-tiny:deepseek_v32 --plan FSFS --json",
                        "ic explain --model my_models:build --plan plan.json   # my_models.py in the working dir"))
    add_model_arguments(parser)
    parser.add_argument("--plan", default=None, help="pattern (FSSF...), plan.json, or omit for all F")
    add_cache_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    model = load_model(args.model, args.seed)
    report = explain(model, forward_inputs(model, example_ids(model, args), args.with_cache), plan=args.plan)
    print_json(report.to_dict()) if args.json else print(report)
    return 0
