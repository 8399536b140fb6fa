"""`ic plan`: build a plan and print the exact flags / lines that make each engine run it
(vLLM, SGLang, HF transformers, TRT-LLM; docs/deploy.md)."""

from __future__ import annotations

import json
from pathlib import Path

from ..deploy import deployment, layout_of
from ..outputs import output_file
from ..plan import LayerPlan, PlanError
from ..tools.models import load_model

EXAMPLES = """examples:
  ic plan --pattern FSSFSSSF                        # one role per decoder layer (every layer has an indexer)
  ic plan --pattern FSSF --config /ckpt/GLM-5.2     # one role per indexer of that checkpoint, mapped onto its layers
  ic plan --freq 4 --model hf-tiny:glm_moe_dsa --out plan.json"""


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="make a plan (pattern / freq) and print the deploy flags of each engine",
        description=__doc__, epilog=EXAMPLES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pattern", help="e.g. FSSSFSSS: one F/S per indexer (of --model/--config if given)")
    source.add_argument("--freq", type=int, help="keep every freq-th indexer (HF index_topk_freq)")
    source.add_argument("--json-file", help="plan.json with index_topk_pattern")
    parser.add_argument("--layers", type=int, help="number of indexer layers (with --freq; default: the model's)")
    parser.add_argument("--offset", type=int, default=2, help="HF index_skip_topk_offset (with --freq)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--model", help="model spec (dsa:NAME, hf:CONFIG.json, hf-tiny:..., ckpt:DIR, "
                        "MODULE:FUNCTION) whose indexers the plan covers; hf:CONFIG.json builds no weights")
    target.add_argument("--config", help="checkpoint directory or its config.json: the plan covers its "
                        "indexers (the safetensors index, when present, says which layers ship them)")
    parser.add_argument("--model-path", help="checkpoint path or name printed in the commands "
                        "(default: the --config directory, else MODEL)")
    parser.add_argument("--json", action="store_true", help="print plan, overrides and commands as JSON")
    parser.add_argument("--out", help="write plan.json here (checked before anything is printed)")
    parser.set_defaults(run=_run)


def _run(args) -> int:
    if args.out:
        output_file(args.out)  # before anything is printed
    layout = _layout(args)
    dep = deployment(_plan(args, layout), layout)
    commands = dep.commands(args.model_path or _default_model_path(args))
    if args.json:
        print(json.dumps({"plan": dep.plan.pattern, "decoder_plan": dep.decoder_plan.pattern,
                          "overrides": dep.overrides, "commands": commands}, indent=2))
    else:
        _print_text(dep, commands)
    if args.out:
        dep.plan.to_json(args.out)
    return 0


def _layout(args):
    if args.config:
        return layout_of(args.config)
    if not args.model:
        return None
    if args.model.startswith("hf:"):
        return layout_of(args.model[3:])  # HF builds indexers as the config says: no weights needed
    return layout_of(load_model(args.model))


def _plan(args, layout) -> LayerPlan:
    if args.freq is not None:
        layers = args.layers or (len(layout.indexer_layers) if layout else None)
        if layers is None:
            raise PlanError("--freq needs --layers (the number of indexer layers) or --model/--config")
        return LayerPlan.from_freq(layers, args.freq, args.offset)
    if args.json_file:
        return LayerPlan.from_json(args.json_file)
    return LayerPlan.from_pattern(args.pattern)


def _default_model_path(args) -> str:
    if args.config:
        path = Path(args.config)
        return str(path if path.is_dir() else path.parent)
    return "MODEL"


def _print_text(dep, commands: dict) -> None:
    plan = dep.plan
    print(f"pattern: {plan.pattern}  ({plan.num_full} of {len(plan)} indexers kept)")
    if dep.layout is None:
        print("decoder layers: the plan is taken as one role per decoder layer (give --model or --config "
              "to map it over a model's indexers and check their weights)")
    else:
        print(f"decoder layers: {dep.decoder_plan.pattern}  (model: {dep.layout.describe()})")
    print(f"overrides: {json.dumps(dep.overrides)}")
    width = max(map(len, commands)) + 1
    for engine, line in commands.items():
        print(f"{engine + ':':<{width}} {line}")
