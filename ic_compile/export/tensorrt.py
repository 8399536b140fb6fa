"""TensorRT lowering and export through torch-tensorrt's dynamo path.

    torch.compile(model, backend="indexcache", options={"plan": "FSSF", "lowering": "tensorrt"})
    ic_compile.export.tensorrt.export_tensorrt(model, inputs, "model.ep", plan="FSSF")   # ic export --format tensorrt

Both run the IndexCache rewrite first (S-layer indexers deleted), check TensorRT's documented limits on
the rewritten graph (no TensorRT needed for that), and only then import torch-tensorrt and call its
documented API: `torch.export.export` -> `torch_tensorrt.dynamo.compile(exported_program, inputs=...)`
-> `torch_tensorrt.save(trt_gm, path, arg_inputs=...)`.

Limits checked (TensorRT operator docs, TopK): k <= 3840 and k <= the size of the reduced axis; the
reduced axis is one of the last four dims; a tensor holds at most 2^31 - 1 elements — so a dense
[B, S, T] indexer score is limited to B·L² < 2^31 (L ≈ 46K at B = 1).

NOT verified here: TensorRT's runtime cannot be installed on this CPU machine (the PyPI `tensorrt`
packages are stubs that fetch NVIDIA's wheels), so no engine was ever built by this code's tests; the
torch-tensorrt calls follow its documentation and are exercised only up to the import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ic_compile.passes.detect_indexers import detect_indexers
from ic_compile.passes.graph_ops import is_parameter, module_path, layer_number, op_name, shape_of

from ..backend import register_lowering
from ..errors import IndexCacheError
from ..plan import PlanError
from ..rewrite import NoIndexerFoundError
from .decompose import decompose_custom_ops
from .program import SEQ_DIM_NAME, CapturedModel, capture_rewritten, check_writable, export_program, named_forward

TOPK_MAX_K = 3840  # TensorRT TopK: k <= 3840
MAX_VOLUME = 2**31 - 1  # TensorRT: a tensor holds at most 2^31 - 1 elements
TOPK_MAX_AXES_FROM_END = 4  # TopK reduces one of the last four dims


class TensorRTUnavailableError(IndexCacheError, RuntimeError):
    """TensorRT / torch-tensorrt cannot be imported on this machine."""


class TensorRTLimitError(PlanError):
    """The (rewritten) graph exceeds a documented TensorRT limit; the message names the layer."""


def require_tensorrt():
    try:
        import tensorrt  # noqa: F401
        import torch_tensorrt
    except Exception as exc:  # ImportError, or the PyPI stub failing to fetch from NVIDIA's index
        raise TensorRTUnavailableError(
            "lowering='tensorrt' needs TensorRT and torch-tensorrt (pip install 'ic-compile[tensorrt]' "
            f"on a machine with NVIDIA's TensorRT runtime and a CUDA GPU); import failed: {exc}") from exc
    return torch_tensorrt


@dataclass
class TopKCheck:
    name: str
    layer: int | None
    module: str
    indexer: bool
    k: int | None  # largest k this TopK takes up to max_seq_len
    volume: int | None  # elements of its input at max_seq_len (indexer) or as captured


@dataclass
class TensorRTReport:
    plan: str
    max_seq_len: int | None
    topk: list[TopKCheck] = field(default_factory=list)
    path: str | None = None
    engine_built: bool = False

    def to_dict(self) -> dict:
        return {"plan": self.plan, "max_seq_len": self.max_seq_len, "path": self.path,
                "engine_built": self.engine_built, "topk": [t.__dict__ for t in self.topk]}

    def __str__(self) -> str:
        idx = [t for t in self.topk if t.indexer]
        return (f"plan {self.plan}: {len(idx)} indexer TopK within TensorRT limits (k <= {TOPK_MAX_K}, "
                f"volume < 2^31 up to L={self.max_seq_len})" + (f"; wrote {self.path}" if self.path else ""))


def _k_value(topk: fx.Node):
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    if isinstance(k, torch.SymInt):
        k = k.node.hint if k.node.has_hint() else None
    return k if isinstance(k, int) else None


def check_tensorrt_limits(gm: fx.GraphModule, *, index_topk: int | None = None, max_seq_len: int | None = None,
                          plan: str = "") -> TensorRTReport:
    """Check every TopK of a (rewritten) graph against TensorRT's limits; raise TensorRTLimitError.

    For indexer TopKs the k that matters is the model's `index_topk` (k = min(index_topk, T) grows with
    the sequence up to it) capped by `max_seq_len`; without them, the k in the graph."""
    detection = detect_indexers(gm)
    indexer_topk = {m.topk: m for m in detection.matches}
    report = TensorRTReport(plan, max_seq_len)
    for node in gm.graph.nodes:
        if op_name(node) != "topk":
            continue
        match = indexer_topk.get(node)
        path = module_path(node)
        layer = match.layer if match else layer_number(path)
        where = f"layer {layer} ({path or node.name})" if layer is not None else f"node {node.name}"
        k = _k_value(node)
        shape = shape_of(node.args[0]) or ()
        if match and index_topk is not None:
            k = index_topk if max_seq_len is None else min(index_topk, max_seq_len)
        if k is None:
            raise TensorRTLimitError(f"{where}: TopK has a k that is not a constant; TensorRT's TopK needs "
                                     f"k <= {TOPK_MAX_K} known at build time — pass index_topk=")
        if k > TOPK_MAX_K:
            raise TensorRTLimitError(
                f"{where}: TopK k={k} exceeds TensorRT's limit k <= {TOPK_MAX_K}"
                + (" (the indexer keeps index_topk keys per query)" if match else "")
                + ". TensorRT cannot select this many keys in one TopK layer; lower index_topk or use "
                  "lowering='inductor'")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
        if shape and isinstance(dim, int) and (dim % len(shape)) < len(shape) - TOPK_MAX_AXES_FROM_END:
            raise TensorRTLimitError(f"{where}: TopK over dim {dim} of a rank-{len(shape)} tensor; TensorRT "
                                     f"reduces only one of the last {TOPK_MAX_AXES_FROM_END} dims")
        volume = None
        if shape:
            sizes = [int(s) if not isinstance(s, torch.SymInt) else int(s.node.hint) for s in shape]
            if match and max_seq_len is not None:  # [B, S, T] at S = T = max_seq_len
                sizes = sizes[:-2] + [max_seq_len, max_seq_len]
            volume = 1
            for s in sizes:
                volume *= s
            if volume > MAX_VOLUME:
                raise TensorRTLimitError(
                    f"{where}: the indexer score TopK input {sizes} has {volume} elements at "
                    f"sequence length {max_seq_len}; TensorRT tensors hold at most 2^31-1 = {MAX_VOLUME}. "
                    "Lower max_seq_len (TensorRT's TopK cannot rank a dense [B, L, L] score beyond that)")
        report.topk.append(TopKCheck(node.name, layer, path, match is not None, k, volume))
    return report


def configured_topk(model) -> int | None:
    """index_topk of an HF config, the reference model's args, or an indexer module."""
    for holder in (getattr(model, "config", None), getattr(model, "args", None)):
        if holder is not None and isinstance(getattr(holder, "index_topk", None), int):
            return holder.index_topk
    for module in model.modules():
        for name in ("index_topk", "topk"):
            if type(module).__name__.endswith("Indexer") and isinstance(getattr(module, name, None), int):
                return getattr(module, name)
    return None


def configured_max_seq(model) -> int | None:
    for holder, name in ((getattr(model, "config", None), "max_position_embeddings"),
                         (getattr(model, "args", None), "max_seq_len")):
        if holder is not None and isinstance(getattr(holder, name, None), int):
            return getattr(holder, name)
    return None


# ------------------------------------------------------------------------ backend lowering
def compile_tensorrt(gm: fx.GraphModule, example_inputs, *, index_topk: int | None = None,
                     max_seq_len: int | None = None, **settings):
    """lowering='tensorrt': gm is the rewritten Dynamo graph. Limits first, then torch-tensorrt."""
    check_tensorrt_limits(gm, index_topk=index_topk, max_seq_len=max_seq_len)
    torch_tensorrt = require_tensorrt()
    decompose_custom_ops(gm)  # e.g. HF's transformers::grouped_mm_fallback: standard ops for TensorRT
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = [i for i, n in enumerate(placeholders) if not is_parameter(n)]
    if not all(isinstance(example_inputs[i], torch.Tensor) for i in user):
        raise PlanError("lowering='tensorrt' needs static shapes: compile with dynamic=False")
    module = _BakedWeights(gm, placeholders, example_inputs)
    args = tuple(example_inputs[i] for i in user)
    exported = torch.export.export(module, args)
    trt_gm = torch_tensorrt.dynamo.compile(exported, inputs=list(args), min_block_size=1, **settings)

    def run(*all_args):
        return trt_gm(*[all_args[i] for i in user])
    return run


class _BakedWeights(torch.nn.Module):
    """Dynamo's graph with its parameter placeholders held as buffers (TensorRT sees them as weights)."""

    def __init__(self, gm, placeholders, example_inputs):
        super().__init__()
        self.gm = gm
        self.slots = []
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            if is_parameter(node):
                self.register_buffer(f"w{i}", value.detach(), persistent=False)
                self.slots.append(f"w{i}")
            else:
                self.slots.append(None)

    def forward(self, *user):
        it = iter(user)
        return self.gm(*[getattr(self, s) if s else next(it) for s in self.slots])


# ------------------------------------------------------------------------ export
def export_tensorrt(model, example_inputs, path, plan=None, *, dynamic_seq: bool = True,
                    max_seq_len: int | None = None, opt_seq_len: int | None = None) -> TensorRTReport:
    """Rewrite for `plan`, check TensorRT limits, build with torch-tensorrt and save to `path`."""
    path = check_writable(path)
    try:
        program = capture_rewritten(model, example_inputs, plan, dynamic_seq=dynamic_seq)
    except NoIndexerFoundError as exc:
        raise NoIndexerFoundError(f"TensorRT export: {exc}") from exc
    model = model.model if isinstance(model, CapturedModel) else model
    dynamic_seq = program.dynamic_seq
    max_seq_len = max_seq_len or configured_max_seq(model)
    report = check_tensorrt_limits(program.result.gm, index_topk=configured_topk(model), max_seq_len=max_seq_len,
                                   plan=str(program.result.plan))
    torch_tensorrt = require_tensorrt()
    module = named_forward(program.module, program.input_names)
    args = program.example_args
    seq = int(args[0].shape[1])
    if dynamic_seq:
        top = max_seq_len or max(seq, 2) * 8
        dim = torch.export.Dim(SEQ_DIM_NAME, min=2, max=top)
        exported, _ = export_program(module, args, {n: ({1: dim} if t.dim() > 1 else {})
                                                     for n, t in zip(program.input_names, args)})
        inputs = [torch_tensorrt.Input(min_shape=(t.shape[0], 2, *t.shape[2:]),
                                       opt_shape=(t.shape[0], opt_seq_len or seq, *t.shape[2:]),
                                       max_shape=(t.shape[0], top, *t.shape[2:]), dtype=t.dtype)
                  if t.dim() > 1 else t for t in args]
    else:
        exported, _ = export_program(module, args, {n: {} for n in program.input_names})
        inputs = list(args)
    trt_gm = torch_tensorrt.dynamo.compile(exported, inputs=inputs, min_block_size=1)
    torch_tensorrt.save(trt_gm, str(path), arg_inputs=list(args))
    report.path, report.engine_built = str(path), True
    return report


__all__ = ["MAX_VOLUME", "TOPK_MAX_K", "TensorRTLimitError", "TensorRTReport", "TensorRTUnavailableError",
           "check_tensorrt_limits", "compile_tensorrt", "configured_topk", "export_tensorrt", "require_tensorrt"]


register_lowering("tensorrt", compile_tensorrt, custom_ops=False)  # options={"lowering": "tensorrt"}
