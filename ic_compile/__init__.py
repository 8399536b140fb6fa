"""ic-compile: IndexCache as a torch.compile backend for DeepSeek-Sparse-Attention models.

    fast = torch.compile(model, backend="indexcache", options={"plan": "FSSSFSSS"})
"""

from .backend import BackendOptions, VerificationError, indexcache_backend
from .explain import ExplainReport, capture_graphs, explain
from .plan import LayerPlan, PlanError
from .rewrite import DetectionUncertainWarning, NoIndexerFoundError, RewriteResult, rewrite

__all__ = ["BackendOptions", "DetectionUncertainWarning", "ExplainReport", "LayerPlan",
           "NoIndexerFoundError", "PlanError", "RewriteResult", "VerificationError", "capture_graphs",
           "explain", "indexcache_backend", "rewrite"]
__version__ = "0.1.0"
