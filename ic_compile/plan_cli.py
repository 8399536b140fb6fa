"""`ic plan`: build a plan and print it in the formats deployments read."""

from __future__ import annotations

import json

from .plan import LayerPlan


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="make a plan (pattern / freq) and print deploy overrides")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pattern", help="e.g. FSSSFSSS")
    source.add_argument("--freq", type=int, help="keep every freq-th indexer (HF index_topk_freq)")
    source.add_argument("--json-file", help="plan.json with index_topk_pattern")
    parser.add_argument("--layers", type=int, help="number of indexer layers (with --freq)")
    parser.add_argument("--offset", type=int, default=2, help="HF index_skip_topk_offset (with --freq)")
    parser.add_argument("--out", help="write plan.json here")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    if args.freq is not None:
        if args.layers is None:
            raise ValueError("--freq needs --layers (the number of indexer layers)")
        plan = LayerPlan.from_freq(args.layers, args.freq, args.offset)
    elif args.json_file:
        plan = LayerPlan.from_json(args.json_file)
    else:
        plan = LayerPlan.from_pattern(args.pattern)
    overrides = json.dumps(plan.to_hf_overrides())
    print(f"pattern: {plan.pattern}  ({plan.num_full} of {len(plan)} indexers kept)")
    print(f"HF transformers: GlmMoeDsaConfig.from_pretrained(..., index_topk_pattern='{plan.pattern}')")
    print(f"vLLM:   vllm serve MODEL --hf-overrides '{overrides}'")
    print(f"SGLang: python -m sglang.launch_server --model-path MODEL --json-model-override-args '{overrides}'")
    if args.out:
        plan.to_json(args.out)
    return 0
