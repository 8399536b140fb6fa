"""`ic` command line. Each subcommand is a module of this package (FEATURE_MODULES) that adds itself
through `register_cli(subparsers)`; shared arguments are in `arguments`, the progress bar in `progress`.
Only this package holds command-line code: the tools and exporters it calls know nothing of argparse.

Conventions every subcommand follows:
- outputs (`--out`, `--html`) are checked with `output_file` / `output_dir` before any model is built,
  so a bad path fails in a second, not after a search or an export;
- errors of this project (bad model spec, plan, output path, export limits) print one line,
  `ic <cmd>: error: ...`, and exit with 2 (IC_TRACEBACK=1 shows the traceback instead);
- progress goes to stderr (tqdm), results to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import IndexCacheError

FEATURE_MODULES = ["ic_compile.cli.explain", "ic_compile.cli.plan", "ic_compile.cli.search", "ic_compile.cli.overlap",
                   "ic_compile.cli.diff", "ic_compile.cli.export"]

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


# ------------------------------------------------------------------ main
def project_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can cause: printed as one line. Anything else is a bug: full traceback."""
    return (IndexCacheError, ValueError, OSError, RuntimeError)


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
