"""ic-compile graph passes: each GraphModule -> GraphModule."""
