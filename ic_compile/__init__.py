"""ic-compile: IndexCache as a torch.compile backend for DeepSeek-Sparse-Attention models.

    fast = torch.compile(model, backend="indexcache", options={"plan": "FSSSFSSS"})

This module is the public surface: the compiler core (plan, rewrite, backend), then the tools and the
exporters built on it. Inside the package, imports point one way: core <- tools/export <- cli.
"""

from .versions import warn_untested

warn_untested()  # once per process: a library outside the tested range (pyproject.toml) is named

# compiler core
from .errors import IndexCacheError
from .plan import LayerPlan, PlanError
from .rewrite import DetectionUncertainWarning, NoIndexerFoundError, RewriteResult, rewrite
from .backend import BackendOptions, OptionsError, VerificationError, indexcache_backend
from .static_cache import static_cache
from .capture import capture_graphs
from .kernels.key_range import NotAKeyRangeError
from .passes.lower_indexer import IndexerPrecisionWarning, UnloweredIndexerWarning
# tools and exporters
from .tools.explain import ExplainReport, explain
from .tools.search import SearchResult, search_plan
from .tools.graph_diff import graph_diff
from .export.onnx import export_onnx

__all__ = ["BackendOptions", "capture_graphs", "DetectionUncertainWarning", "explain", "ExplainReport",
           "export_onnx", "graph_diff", "indexcache_backend", "IndexCacheError", "IndexerPrecisionWarning",
           "LayerPlan", "NoIndexerFoundError", "NotAKeyRangeError", "OptionsError", "PlanError", "rewrite",
           "RewriteResult", "search_plan", "SearchResult", "static_cache", "UnloweredIndexerWarning",
           "VerificationError"]
__version__ = "0.1.0"
