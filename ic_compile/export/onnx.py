"""ONNX export of the REWRITTEN model (S-layer indexers absent); `ic export` (ic_compile.cli.export).

    ic_compile.export_onnx(model, {"input_ids": ids, "use_cache": False}, "model.onnx", plan="FSSF")

Route (and why):
1. Dynamo captures the model's FX graph with the sequence axis marked dynamic (the same graph the
   `indexcache` backend receives, so the exported graph is exactly what the backend runs).
   Dynamo lifts parameters and buffers to graph inputs (placeholders) and adds one SymInt
   placeholder per dynamic size; we keep the real tensors Dynamo hands its backend.
2. `rewrite(gm, plan)` deletes the S-layer indexers (same passes as the backend).
   Steps 1, 2 and 4 are `ic_compile.export.program` (shared with the TensorRT exporter).
3. Custom ops are replaced by decompositions into standard torch ops (`ic_compile.export.decompose`:
   `ic::indexer_topk`, `ic::sparse_attention`, `ic::sparse_mla`, and HF's
   `transformers::grouped_mm_fallback` MoE matmul), so the ONNX graph only holds standard ONNX ops:
   calls in the FX graph directly, and calls that only appear when tracing (a helper such as
   `lowered_indexer` calling `torch.ops.ic.indexer_topk`) through `ExportedProgram.run_decompositions`.
4. `RewrittenModule` wraps the rewritten GraphModule: parameters/buffers become its (non-persistent)
   buffers, SymInt placeholders are recomputed from the user inputs' shapes, so its forward takes only
   the user's tensors. That module goes through `torch.export.export` (non-strict, a dynamic "seq"
   axis, implied guards deferred to runtime asserts — as torch.onnx's own capture does), then
   `torch.onnx.export(exported_program, dynamo=True)`; the symbolic size is renamed "seq" in the ONNX file.
The alternative — `torch.export` first, then rewriting the ATen graph — would need the detection
passes to understand ATen ops (`aten.topk.default`, decomposed linears); they work on Dynamo's
torch-level graph, so we export the graph they already rewrote.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .decompose import DECOMPOSITIONS, ExportError, decompose_custom_ops, register_decomposition  # noqa: F401
from .program import (SEQ_DIM_NAME, CapturedModel, RewrittenModule, RewrittenProgram,  # noqa: F401 (re-exported)
                      capture_model, capture_rewritten, check_writable, export_program, named_forward,
                      quiet_third_party)


@dataclass
class OnnxExport:
    path: str
    plan: str
    num_full: int  # F layers in the plan
    indexer_topk: int  # ONNX TopK nodes over the key axis (== num_full)
    other_topk: int  # other TopK nodes (MoE routers, sorts)
    nodes: int
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict  # input name -> {axis: "seq"}
    decomposed_ops: list[str]
    removed_torch_nodes: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (f"wrote {self.path}: plan {self.plan}, {self.nodes} ONNX nodes, {self.indexer_topk} indexer TopK "
                f"(key axis; = {self.num_full} F layers), {self.other_topk} other TopK (MoE routing), "
                f"inputs {self.inputs} (dynamic {self.dynamic_axes}), outputs {self.outputs}; "
                f"{self.removed_torch_nodes} graph nodes removed by the rewrite before export"
                + (f"; custom ops decomposed: {sorted(set(self.decomposed_ops))}" if self.decomposed_ops else ""))


ONNX_STAGES = ["capture (Dynamo)", "rewrite for the plan", "torch.export", "convert to ONNX", "save + check"]


def export_onnx(model: nn.Module, example_inputs, path, plan=None, *, dynamic_seq: bool = True,
                opset: int | None = None, optimize: bool = False, kernels: bool = False,
                progress=None) -> OnnxExport:
    """Export the model rewritten for `plan` to ONNX at `path`; returns what was written.
    `model` may be a `CapturedModel` (then `example_inputs` is ignored) to export several plans from one
    capture. `progress`: anything with a `step(name)` context manager, called for each of ONNX_STAGES
    (the CLI passes its progress bar, `ic_compile.cli.progress.Stages`)."""
    path = check_writable(path)
    stages = progress or _NoStages()
    with quiet_third_party():
        with stages.step("capture (Dynamo)"):
            captured = model if isinstance(model, CapturedModel) else capture_model(
                model, example_inputs, dynamic_seq=dynamic_seq)
        with stages.step("rewrite for the plan"):
            program = capture_rewritten(captured, None, plan, kernels=kernels)
        return _export_rewritten(program, path, opset, optimize, stages)


class _NoStages:
    """Stages' interface without a bar (the API's default)."""

    @contextlib.contextmanager
    def step(self, _name: str):
        yield


def _export_rewritten(program: RewrittenProgram, path: Path, opset, optimize: bool, stages) -> OnnxExport:
    dynamic_seq = program.dynamic_seq
    seq = torch.export.Dim(SEQ_DIM_NAME, min=2, max=1 << 20)
    dynamic = {name: ({1: seq} if dynamic_seq and t.dim() > 1 else {})
               for name, t in zip(program.input_names, program.example_args)}
    module = named_forward(program.module, program.input_names)
    num_outputs = len(module(*program.example_args))
    output_names = ["logits"] + [f"output_{i}" for i in range(1, num_outputs)]
    kwargs = {} if opset is None else {"opset_version": opset}
    with torch.no_grad():
        with stages.step("torch.export"):
            exported, decomposed = export_program(module, program.example_args, dynamic)
        with stages.step("convert to ONNX"):
            onnx_program = torch.onnx.export(exported, dynamo=True, input_names=program.input_names,
                                             output_names=output_names, optimize=optimize, verbose=False,
                                             **kwargs)
    with stages.step("save + check"):
        onnx_program.save(str(path))
        import onnx
        proto = onnx.load(str(path))
        if dynamic_seq and _name_seq_axis(proto, {n for n, d in dynamic.items() if d}):
            onnx.save(proto, str(path))
        onnx.checker.check_model(proto)
    key_topk, other_topk = count_topk(proto)
    result = program.result
    return OnnxExport(
        path=str(path), plan=str(result.plan), num_full=result.plan.num_full if result.plan else 0,
        indexer_topk=key_topk, other_topk=other_topk, nodes=len(proto.graph.node),
        inputs=program.input_names, outputs=output_names,
        dynamic_axes={n: {a: SEQ_DIM_NAME for a in d} for n, d in dynamic.items() if d},
        decomposed_ops=sorted(set(program.decomposed + decomposed)), removed_torch_nodes=len(result.removed))


def _name_seq_axis(proto, inputs: set[str]) -> bool:
    """torch.export names the dynamic size after its symbol (s75): call it "seq" everywhere."""
    symbols = {d.dim_param for i in proto.graph.input if i.name in inputs
               for d in list(i.type.tensor_type.shape.dim)[1:2] if d.dim_param and d.dim_param != SEQ_DIM_NAME}
    if len(symbols) != 1:
        return False
    pattern = re.compile(rf"\b{re.escape(symbols.pop())}\b")
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(SEQ_DIM_NAME, dim.dim_param)
    return True


def count_topk(proto, seq_name: str = SEQ_DIM_NAME) -> tuple[int, int]:
    """(TopK over the key axis, other TopK) in an ONNX model exported with a dynamic `seq` axis.

    An indexer's TopK ranks scores [B, S, T] over T: its input's last two dims are the dynamic sequence
    size (prefill, T = S; "seq + k" for the -inf padded scores of the ic::indexer_topk decomposition).
    A MoE router's TopK ranks experts (a static size); a sort of routed tokens (exported as TopK too) has a single axis of size k*B*S."""
    known = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    key, other = 0, 0
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    for node in nodes:
        if node.op_type != "TopK":
            continue
        info = known.get(node.input[0])
        dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim] if info else []
        key_axis = isinstance(dims[-1], str) and re.search(rf"\b{seq_name}\b", dims[-1]) if dims else None
        if len(dims) >= 2 and dims[-2] == seq_name and key_axis:  # T = seq, or seq + k (padded)
            key += 1
        else:
            other += 1
    return key, other


__all__ = ["CapturedModel", "DECOMPOSITIONS", "ExportError", "ONNX_STAGES", "OnnxExport", "RewrittenModule",
           "RewrittenProgram", "capture_model", "capture_rewritten", "count_topk", "decompose_custom_ops",
           "export_onnx", "register_decomposition"]
