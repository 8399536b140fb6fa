"""Analysis tools built on the compiler core: explain, graph_diff, search, overlap, training, model specs.

Tools import the core (`ic_compile.plan`, `ic_compile.rewrite`, `ic_compile.capture`, ...); the core never
imports a tool, and the CLI (`ic_compile.cli`) is the only thing that imports the tools' command lines.
"""
