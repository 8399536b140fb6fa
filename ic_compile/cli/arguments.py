"""Arguments and inputs shared by the `ic` subcommands: --model/--seq/--batch/--seed, --with-cache,
--data checks, the example token ids and forward inputs a subcommand builds, and JSON printing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..tools.calibration import text_files
from ..tools.models import vocab_size

MODEL_HELP = ("dsa:NAME[:PATTERN] (reference model; NAME tiny|small|...) | hf:CONFIG.json (random weights) | "
              "hf-tiny:glm_moe_dsa|deepseek_v32 | ckpt:DIR (examples/train_dsa.py output) | MODULE:FUNCTION "
              "(factory in the working directory or on sys.path returning a model or (model, inputs))")


def examples(*lines: str) -> str:
    """An epilog of example command lines for a subcommand's --help."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, seq: int = 32, batch: int = 1,
                        seq_help: str = "example sequence length (random token ids)") -> None:
    parser.add_argument("--model", default="dsa:tiny", help=MODEL_HELP)
    parser.add_argument("--seq", type=positive_int, default=seq, help=seq_help)
    parser.add_argument("--batch", type=positive_int, default=batch, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with-cache", action="store_true",
                        help="prefill into an empty KV cache, so the indexer key-cache writes are in the graph "
                             "and the ones the plan removes are counted")


def check_data_paths(paths) -> None:
    """--data: every path exists and some file holds text, checked before the model is built."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"--data {' '.join(map(str, missing))}: does not exist; give text files or directories")
    if not text_files(paths):
        raise ValueError(f"--data {' '.join(map(str, paths))}: no files in there; give text files or directories")


def max_positions(model) -> int | None:
    """The longest sequence the model's position tables cover (HF config or reference-model args)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "max_position_embeddings", None):
        return config.max_position_embeddings
    return getattr(getattr(model, "args", None), "max_seq_len", None)


def example_ids(model, args) -> torch.Tensor:
    limit = max_positions(model)
    if limit is not None and args.seq > limit:
        raise ValueError(f"--seq {args.seq} is longer than the model's {limit} positions "
                         f"(--model {args.model}); use --seq {limit} or less")
    return torch.randint(0, vocab_size(model), (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))


def forward_inputs(model, ids: torch.Tensor, cache: bool = False) -> dict:
    """Keyword inputs for a prefill, for HF and reference models alike; cache=True prefills an empty
    KV cache (HF DynamicCache, the reference model's static caches), so cache writes are in the graph."""
    if hasattr(model, "config"):
        if not cache:
            return {"input_ids": ids, "use_cache": False}
        from transformers import DynamicCache
        return {"input_ids": ids, "use_cache": True, "past_key_values": DynamicCache(config=model.config)}
    if not cache:
        return {"idx": ids}
    if not hasattr(model, "setup_caches"):
        raise ValueError("--with-cache: this model has no setup_caches(); run without --with-cache")
    model.setup_caches(ids.shape[0], ids.shape[1])
    return {"idx": ids, "input_pos": torch.arange(ids.shape[1])}


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
