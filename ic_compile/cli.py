"""`ic` command line. Each feature module adds its subcommand through `register_cli(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from .models import MODEL_HELP, vocab_size

FEATURE_MODULES = ["ic_compile.explain", "ic_compile.plan_cli", "ic_compile.search", "ic_compile.overlap",
                   "ic_compile.graph_diff", "ic_compile.export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ic", description="ic-compile: IndexCache for DSA models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in FEATURE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(subparsers)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, seq: int = 32, batch: int = 1,
                        seq_help: str = "example sequence length") -> None:
    parser.add_argument("--model", default="dsa:tiny", help=MODEL_HELP)
    parser.add_argument("--seq", type=int, default=seq, help=seq_help)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seed", type=int, default=0)


def example_ids(model, args) -> torch.Tensor:
    return torch.randint(0, vocab_size(model), (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))


def forward_inputs(model, ids: torch.Tensor) -> dict:
    """Keyword inputs for a prefill without cache, for HF and reference models alike."""
    if hasattr(model, "config"):
        return {"input_ids": ids, "use_cache": False}
    return {"idx": ids}


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ic {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
