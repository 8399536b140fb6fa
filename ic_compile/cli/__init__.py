"""`ic` command line. Each feature module adds its subcommand through `register_cli(subparsers)`.

Conventions every subcommand follows:
- outputs (`--out`, `--html`) are checked with `output_file` / `output_dir` before any model is built,
  so a bad path fails in a second, not after a search or an export;
- errors of this project (bad model spec, plan, output path, export limits) print one line,
  `ic <cmd>: error: ...`, and exit with 2 (IC_TRACEBACK=1 shows the traceback instead);
- progress goes to stderr (tqdm), results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys

import torch

from ..tools.models import MODEL_HELP, ModelSpecError, vocab_size

FEATURE_MODULES = ["ic_compile.tools.explain", "ic_compile.cli.plan", "ic_compile.tools.search", "ic_compile.tools.overlap",
                   "ic_compile.tools.graph_diff", "ic_compile.export.onnx"]

EXAMPLES = """examples:
  ic explain --model dsa:tiny --plan FSSF
  ic diff --model hf-tiny:glm_moe_dsa --plan FSFS --seq-len 4096 --html diff.html
  ic search --model dsa:tiny --data docs/ --num-full 2 --out search_out
  ic export --model dsa:tiny --plan FSSF --out model.onnx
  ic plan --pattern FSSSFSSS

each subcommand's --help lists its options and examples; IC_TRACEBACK=1 shows tracebacks of errors"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default, unless it has none
    (None / False: argparse's ArgumentDefaultsHelpFormatter would print "(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ic", description="ic-compile: IndexCache for DeepSeek-Sparse-Attention models "
                    "(arXiv 2603.12201)", epilog=EXAMPLES)
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for name in FEATURE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(subparsers)
    return parser


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


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--with-cache", action="store_true",
                        help="prefill into an empty KV cache, so the indexer key-cache writes are in the graph "
                             "and the ones the plan removes are counted")


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


# ------------------------------------------------------------------ progress (stderr)
class Stages:
    """A tqdm bar over the named stages of a long command, on stderr; `with stages.step("capture")`."""

    def __init__(self, names: list[str], desc: str, enabled: bool | None = None):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=len(names), desc=desc, file=sys.stderr, leave=False,
                        disable=not (progress_enabled() if enabled is None else enabled),
                        bar_format="{desc}: stage {n}/{total} |{bar}| {elapsed}{postfix}")

    @contextlib.contextmanager
    def step(self, name: str):
        self.bar.set_postfix_str(name)
        yield
        self.bar.update(1)

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # also on errors: the error line must not land on the bar's line


def progress_enabled() -> bool:
    """Bars only for a person watching (IC_PROGRESS=0/1 forces it off/on)."""
    forced = os.environ.get("IC_PROGRESS")
    return forced != "0" if forced is not None else sys.stderr.isatty()


# ------------------------------------------------------------------ main
def project_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause: printed as one line. Anything else is a bug: full traceback."""
    from ..backend import VerificationError
    return (ValueError, OSError, ModelSpecError, VerificationError, RuntimeError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except project_errors() as exc:
        if os.environ.get("IC_TRACEBACK"):
            raise
        print(f"ic {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ic {args.command}: interrupted", file=sys.stderr)
        return 130


def one_line(exc: BaseException) -> str:
    """Our messages are one line; a third-party one may be many (Dynamo appends hints): keep the first."""
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(exc).__name__
    # our errors are ValueErrors whose text says it all; name any other kind (OSError, torch's RuntimeError)
    # and say how to see where it came from
    if isinstance(exc, ValueError):
        return text
    return f"{type(exc).__name__}: {text} (IC_TRACEBACK=1 shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())
