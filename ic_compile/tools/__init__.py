"""Analysis tools built on the compiler core: explain, graph_diff (+ graph_diff_html, attribution),
search (+ evaluators, calibration), overlap, training, model specs (models).

Tools import the core (`ic_compile.plan`, `ic_compile.rewrite`, `ic_compile.capture`, ...); the core never
imports a tool, and no tool imports the CLI: the `ic` subcommands live in `ic_compile.cli`.
"""
