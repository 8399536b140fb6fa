"""What every exporter shares: the model captured by Dynamo, rewritten for a plan, with custom ops
decomposed, as a module whose forward takes only the user's tensors; then `torch.export` of it.

    captured = capture_model(model, inputs)                     # one Dynamo capture, reusable
    program = capture_rewritten(captured, None, "FSSF")           # RewrittenProgram
    exported, ops = export_program(named_forward(program.module, program.input_names), program.example_args,
                                   dynamic_shapes)

Dynamo lifts parameters and buffers to graph inputs (placeholders) and adds one SymInt placeholder per
dynamic size; `RewrittenModule` holds the real tensors Dynamo handed its backend as (non-persistent)
buffers and recomputes the sizes from the user inputs' shapes. See `ic_compile.export.onnx` for the
route and why it exports the graph the rewrite already changed.
"""

from __future__ import annotations

import contextlib
import keyword
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import fx, nn

from ..capture import record_graphs
from ..outputs import OutputPathError, output_file
from ..rewrite import NoIndexerFoundError, RewriteResult, copy_graph_module, rewrite
from .decompose import DECOMPOSITIONS, ExportError, custom_op_name, decompose_custom_ops, no_decomposition_error

SEQ_DIM_NAME = "seq"


@dataclass
class RewrittenProgram:
    module: "RewrittenModule"  # forward(*user inputs) -> the rewritten graph's outputs
    result: RewriteResult
    input_names: list[str]
    example_args: tuple  # the user tensors, in forward order
    decomposed: list[str] = field(default_factory=list)
    dynamic_seq: bool = True


class RewrittenModule(nn.Module):
    """The rewritten Dynamo graph as a module whose forward takes only the user's tensors."""

    def __init__(self, gm: fx.GraphModule, slots: list[tuple], constants: dict[str, torch.Tensor],
                 input_names: list[str]):
        super().__init__()
        self.gm = gm
        self.slots = slots  # per placeholder: ("input", i) | ("const", name) | ("size", i, dim)
        for name, tensor in constants.items():
            self.register_buffer(name, tensor, persistent=False)
        self.input_names = input_names

    def forward(self, *inputs):
        args = []
        for slot in self.slots:
            if slot[0] == "input":
                args.append(inputs[slot[1]])
            elif slot[0] == "const":
                args.append(getattr(self, slot[1]))
            else:
                args.append(inputs[slot[1]].shape[slot[2]])
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _user_tensors(example_inputs) -> tuple[list[str], list[torch.Tensor], Callable]:
    """(names, tensors, call(model, tensors)) for a dict / tensor / tuple of example inputs."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        keys = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        rest = {k: v for k, v in example_inputs.items() if k not in keys}
        names = list(keys)
        return names, [example_inputs[k] for k in keys], lambda m, ts: m(**dict(zip(keys, ts)), **rest)
    if isinstance(example_inputs, (list, tuple)):
        positions = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor)]

        def call(m, ts):
            args = list(example_inputs)
            for i, t in zip(positions, ts):
                args[i] = t
            return m(*args)
        return [f"input_{i}" for i in positions], [example_inputs[i] for i in positions], call
    raise ExportError(f"example_inputs must be a tensor, a tuple or a dict of keyword inputs, got "
                      f"{type(example_inputs).__name__}")


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return f"_{name}" if not name or name[0].isdigit() or keyword.iskeyword(name) else name


@dataclass
class CapturedModel:
    """One Dynamo capture of a model, reusable for several plans (rewrite never modifies it):

        captured = capture_model(model, inputs)
        for plan in ("FSSF", "FSSS"):
            export_onnx(captured, None, f"{plan}.onnx", plan=plan)
    """
    gm: fx.GraphModule
    graph_inputs: list  # what Dynamo passed its backend: parameters, buffers, user tensors, sizes
    names: list[str]  # user input names
    tensors: list[torch.Tensor]  # user inputs (our clones, marked dynamic)
    dynamic_seq: bool
    model: nn.Module


def capture_model(model: nn.Module, example_inputs, *, dynamic_seq: bool = True, seq_dim: int = 1) -> CapturedModel:
    names, tensors, call = _user_tensors(example_inputs)
    if not tensors:
        raise ExportError("example_inputs hold no tensor to export the model for")
    tensors = [t.clone() for t in tensors]  # our own objects: dynamic marks and identity lookup
    if dynamic_seq:
        for t in tensors:
            if t.dim() > seq_dim:
                torch._dynamo.mark_dynamic(t, seq_dim)
    recorder = record_graphs(model, lambda compiled: call(compiled, tensors), dynamic=None, fresh=True)
    if len(recorder.graphs) != 1:
        raise ExportError(f"the model was captured as {len(recorder.graphs)} graphs (graph breaks); export needs "
                          "one graph holding every layer — check torch.compile(model, fullgraph=True)")
    return CapturedModel(recorder.graphs[0], recorder.inputs[0], names, tensors, dynamic_seq, model)


def capture_rewritten(model, example_inputs, plan=None, *, dynamic_seq: bool = True, seq_dim: int = 1,
                      require_indexer: bool = True, kernels: bool = False) -> RewrittenProgram:
    """Capture (unless `model` is a CapturedModel already), rewrite for `plan`, decompose custom ops, wrap.
    kernels=True: F indexers are lowered to `ic::indexer_topk` first (as the backend does on CUDA), and
    that op is then exported through its standard-op decomposition, with the model's dense mask
    (indexer_mask="dense": exact for any mask; an ONNX graph could not raise on a non-range one). The
    linears stay linears (merge_linears=False): ONNX and TensorRT have their own GEMMs; no Inductor-only
    pass runs (lowering="export")."""
    captured = model if isinstance(model, CapturedModel) else capture_model(
        model, example_inputs, dynamic_seq=dynamic_seq, seq_dim=seq_dim)
    gm = captured.gm
    result = rewrite(gm, plan, strict=True, kernels=kernels, indexer_mask="dense", merge_linears=False,
                     lowering="export")
    if require_indexer and not result.detection.matches:
        raise NoIndexerFoundError(f"cannot export with plan {plan!r}: {result.message}. Is this a DSA model? "
                                  "Without a lightning indexer there is nothing to share.")
    work = result.gm if result.gm is not gm else copy_graph_module(gm)
    decomposed = decompose_custom_ops(work)
    slots, constants = _slots(work, captured.graph_inputs, captured.tensors)
    input_names = [_identifier(n) for n in captured.names]
    module = RewrittenModule(work, slots, constants, input_names).eval()
    return RewrittenProgram(module, result, input_names, tuple(captured.tensors), decomposed,
                            dynamic_seq=captured.dynamic_seq)


def _slots(gm: fx.GraphModule, graph_inputs: list, user: list[torch.Tensor]):
    by_id = {id(t): i for i, t in enumerate(user)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(graph_inputs):
        raise ExportError(f"captured graph has {len(placeholders)} inputs but Dynamo passed "
                          f"{len(graph_inputs)} values")
    sizes = {}  # str(symbol) -> (input index, dim)
    for node, value in zip(placeholders, graph_inputs):
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            fake = node.meta.get("example_value")
            for dim, size in enumerate(getattr(fake, "shape", ())):
                if isinstance(size, torch.SymInt):
                    sizes.setdefault(str(size.node.expr), (by_id[id(value)], dim))
    slots, constants = [], {}
    for node, value in zip(placeholders, graph_inputs):
        if isinstance(value, torch.Tensor) and id(value) in by_id:
            slots.append(("input", by_id[id(value)]))
        elif isinstance(value, torch.Tensor):
            name = f"c{len(constants)}_" + _identifier(node.name)[-40:]
            constants[name] = value.detach()
            slots.append(("const", name))
        else:
            expr = node.meta.get("example_value")
            key = str(expr.node.expr) if isinstance(expr, torch.SymInt) else None
            if key not in sizes:
                raise ExportError(f"graph input {node.name!r} is a size ({expr}) that is not the size of "
                                  "any example input; cannot export it")
            slots.append(("size", *sizes[key]))
    return slots, constants


def check_writable(path) -> Path:
    """Fail before the export (20-100 s) if `path` cannot be written. A real write test: root passes
    os.access everywhere (e.g. /proc)."""
    try:
        return output_file(path, flag="output")
    except OutputPathError as exc:
        raise ExportError(str(exc)) from None


# Third-party log lines and warnings every export prints that say nothing about the user's model:
# ops of a package that is not installed, a pytree deprecation inside torch, and onnx_ir defaulting an
# empty attribute list to INTS (the checker and onnxruntime accept the result; tests compare outputs).
QUIET_LOG_MESSAGES = {
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    "onnx_ir._convenience": ("Attribute type is ambiguous",),
}


QUIET_WARNINGS = [(FutureWarning, r".*isinstance\(treespec, LeafSpec\)")]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_third_party():
    """Silence only the known-harmless messages above, only around the export; ours still show."""
    filters = [(logging.getLogger(name), _DropMessages(prefixes)) for name, prefixes in QUIET_LOG_MESSAGES.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def export_program(module: nn.Module, args: tuple, dynamic_shapes: dict):
    """torch.export (non-strict, size-oblivious like torch.onnx's own capture), then custom ops that
    survive tracing (e.g. `ic::indexer_topk` called from inside a lowered-indexer helper) are replaced by
    their standard-op decompositions with `ExportedProgram.run_decompositions`."""
    # guards the captured graph implies (e.g. seq >= index_topk) become runtime asserts, as in torch.onnx
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                       prefer_deferred_runtime_asserts_over_guards=True)
    custom = {n.target: custom_op_name(n.target) for n in exported.graph.nodes
              if n.op == "call_function" and custom_op_name(n.target)}
    if custom:
        missing = sorted(name for name in custom.values() if name not in DECOMPOSITIONS)
        if missing:
            raise no_decomposition_error(missing[0])
        exported = exported.run_decompositions({op: DECOMPOSITIONS[name] for op, name in custom.items()})
    return exported, sorted(set(custom.values()))


def named_forward(module: RewrittenModule, names: list[str]) -> nn.Module:
    """A module whose forward has named parameters (torch.export maps dynamic_shapes by name)."""
    params = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.inner({params})\n", namespace)
    cls = type("IndexCacheExport", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    wrapper.inner = module
    return wrapper.eval()


__all__ = ["CapturedModel", "QUIET_LOG_MESSAGES", "QUIET_WARNINGS", "RewrittenModule", "RewrittenProgram",
           "SEQ_DIM_NAME", "capture_model", "capture_rewritten", "check_writable", "export_program",
           "named_forward", "quiet_third_party"]
