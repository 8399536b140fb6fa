"""ic-compile: IndexCache as a torch.compile backend for DeepSeek-Sparse-Attention models.

    fast = torch.compile(model, backend="indexcache", options={"plan": "FSSSFSSS"})
"""

from .versions import warn_untested

warn_untested()  # once per process: a library outside the tested range (pyproject.toml) is named

from .backend import BackendOptions, VerificationError, indexcache_backend
from .tools.explain import ExplainReport, capture_graphs, explain
from .plan import LayerPlan, PlanError
from .rewrite import DetectionUncertainWarning, NoIndexerFoundError, RewriteResult, rewrite
from .tools.search import SearchResult, search_plan
from .export.onnx import export_onnx
from .tools.graph_diff import graph_diff
from .static_cache import static_cache
from .kernels.key_range import NotAKeyRangeError

__all__ = ["BackendOptions", "DetectionUncertainWarning", "ExplainReport", "LayerPlan",
           "NoIndexerFoundError", "NotAKeyRangeError", "PlanError", "RewriteResult", "SearchResult", "VerificationError", "capture_graphs",
           "explain", "export_onnx", "graph_diff", "indexcache_backend", "rewrite", "search_plan", "static_cache"]
__version__ = "0.1.0"
