"""`ic export`: the REWRITTEN model (S-layer indexers absent) as ONNX, or as a TensorRT engine.

    ic_compile.export_onnx(model, {"input_ids": ids, "use_cache": False}, "model.onnx", plan="FSSF")

Route (and why):
1. Dynamo captures the model's FX graph with the sequence axis marked dynamic (the same graph the
   `indexcache` backend receives, so the exported graph is exactly what the backend runs).
   Dynamo lifts parameters and buffers to graph inputs (placeholders) and adds one SymInt
   placeholder per dynamic size; we keep the real tensors Dynamo hands its backend.
2. `rewrite(gm, plan)` deletes the S-layer indexers (same passes as the backend).
3. Custom ops are replaced by decompositions into standard torch ops (`DECOMPOSITIONS`:
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
import keyword
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import fx, nn

from ic_compile.kernels.reference import mask_indexer_scores, sparse_attention_rows

from ..outputs import OutputPathError, output_file
from ..rewrite import NoIndexerFoundError, RewriteResult, rewrite

FORMATS = ("onnx", "tensorrt")
SEQ_DIM_NAME = "seq"


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------ decompositions
# One maths per op: the kernels' pure-torch references (kernels/reference.py, also the tests' oracle
# and the CPU fallback), called on all queries at once. What the references add around these bodies
# does not export: their query-chunk loop (`for s0 in range(0, S, chunk)`, chunk from the symbolic
# S and T) would fix the trip count to the traced length; topk_indices_from_scores' `min(topk, T)` /
# `if kk < topk` on the key count would guard the graph to one side of T = topk; and
# indexer_scores_ref's in-place relu_ (it bounds the CPU reference's peak memory) is rejected by
# run_decompositions ("aot_autograd expected to have an entirely functional graph").
def _indexer_topk(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True):
    """ic::indexer_topk in standard ops (no loops, symbolic S/T): q [B,S,H,D], k [B,T,D], w [B,S,H]
    -> int32 [B,S,topk], -1 where fewer than topk keys are allowed (kernels/reference.py's scores).
    key_range is read as ranges without the op's contiguity check (the export lowers with
    indexer_mask="dense", so exported models hand this the mask)."""
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())  # indexer_scores_ref, relu out of place
    scores = torch.einsum("bsht,bsh->bst", logits.relu(), w.float())
    scores = mask_indexer_scores(scores, q.shape[1], mask, causal, key_range)  # [B, S, T]
    # pad with topk -inf columns so that topk(k) is valid for any T (the pads come back as -1)
    scores = torch.nn.functional.pad(scores, (0, topk), value=float("-inf"))
    values, index = scores.topk(topk, dim=-1)
    return torch.where(values == float("-inf"), torch.full_like(index, -1), index).to(torch.int32)


def _sparse_attention(q, k, v, indices, scale, causal=True):
    """ic::sparse_attention in standard ops: q [B,S,Hq,D], k [B,T,Hk,D], v [B,T,Hk,Dv], indices [B,S,K]."""
    return sparse_attention_rows(q, k, v, indices, scale, causal)


def _sparse_mla(q, kv, indices, scale, dv, causal=True):
    """ic::sparse_mla in standard ops: q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr], indices [B,S,K] -> [B,S,H,dv]
    (kv as one key/value head, values its first dv channels, as kernels/reference.sparse_mla_ref)."""
    return sparse_attention_rows(q, kv[:, :, None, :], None, indices, scale, causal, dv=dv)


def _grouped_mm(input, weight, offs):
    """transformers::grouped_mm_fallback (rows sorted by expert, offs = cumulative row ends) in standard
    ops: every expert on every row, then each row picks its expert (E x the FLOPs; export-only)."""
    rows = torch.arange(input.shape[0], device=input.device)
    expert = (rows[:, None] >= offs[None, :].to(rows.dtype)).sum(-1).clamp_max(weight.shape[0] - 1)
    every = torch.einsum("si,eio->seo", input, weight)  # [rows, E, out]
    index = expert[:, None, None].expand(-1, 1, weight.shape[2])
    return every.gather(1, index).squeeze(1)


DECOMPOSITIONS: dict[str, Callable] = {
    "ic::indexer_topk": _indexer_topk,
    "ic::sparse_attention": _sparse_attention,
    "ic::sparse_mla": _sparse_mla,
    "transformers::grouped_mm_fallback": _grouped_mm,
}
STANDARD_NAMESPACES = {"aten", "prims", "prim", "_operator", "higher_order"}


def register_decomposition(qualified_name: str, fn: Callable) -> None:
    """Teach `export_onnx` a custom op: `fn` takes the op's arguments and uses standard torch ops only."""
    if "::" not in qualified_name:
        raise ExportError(f"custom op name must be 'namespace::name', got {qualified_name!r}")
    DECOMPOSITIONS[qualified_name] = fn


def custom_op_name(target) -> str | None:
    """'ns::name' of a torch.library custom op (OpOverload or packet), None for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    namespace = name.split("::")[0]
    return None if namespace in STANDARD_NAMESPACES else name


def decompose_custom_ops(gm: fx.GraphModule) -> list[str]:
    """Replace every custom-op call by its decomposition (in place); returns the ops replaced."""
    replaced = []
    for node in gm.graph.nodes:
        name = custom_op_name(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        if name not in DECOMPOSITIONS:
            raise ExportError(f"custom op {name} (node {node.name!r}) has no decomposition into standard "
                              "ops, so it cannot be exported to ONNX; register one with "
                              "ic_compile.export.onnx.register_decomposition('" + name + "', fn)")
        node.target = DECOMPOSITIONS[name]
        replaced.append(name)
    if replaced:
        gm.recompile()
    return replaced


# ------------------------------------------------------------------------------ capture + wrap
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
    graphs: list[tuple[fx.GraphModule, list]] = []

    def backend(gm, inputs, **_):
        graphs.append((gm, list(inputs)))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            call(torch.compile(model, backend=backend, dynamic=None), tensors)
    finally:
        torch._dynamo.reset()
    if len(graphs) != 1:
        raise ExportError(f"the model was captured as {len(graphs)} graphs (graph breaks); export needs one "
                          "graph holding every layer — check torch.compile(model, fullgraph=True)")
    return CapturedModel(graphs[0][0], graphs[0][1], names, tensors, dynamic_seq, model)


def capture_rewritten(model, example_inputs, plan=None, *, dynamic_seq: bool = True, seq_dim: int = 1,
                      require_indexer: bool = True, kernels: bool = False) -> RewrittenProgram:
    """Capture (unless `model` is a CapturedModel already), rewrite for `plan`, decompose custom ops, wrap.
    kernels=True: F indexers are lowered to `ic::indexer_topk` first (as the backend does on CUDA), and
    that op is then exported through its standard-op decomposition, with the model's dense mask
    (indexer_mask="dense": exact for any mask; an ONNX graph could not raise on a non-range one)."""
    captured = model if isinstance(model, CapturedModel) else capture_model(
        model, example_inputs, dynamic_seq=dynamic_seq, seq_dim=seq_dim)
    gm = captured.gm
    result = rewrite(gm, plan, strict=True, kernels=kernels, indexer_mask="dense")
    if require_indexer and not result.detection.matches:
        raise NoIndexerFoundError(f"cannot export with plan {plan!r}: {result.message}. Is this a DSA model? "
                                  "Without a lightning indexer there is nothing to share.")
    work = result.gm if result.gm is not gm else copy_module(gm)
    decomposed = decompose_custom_ops(work)
    slots, constants = _slots(work, captured.graph_inputs, captured.tensors)
    input_names = [_identifier(n) for n in captured.names]
    module = RewrittenModule(work, slots, constants, input_names).eval()
    return RewrittenProgram(module, result, input_names, tuple(captured.tensors), decomposed,
                            dynamic_seq=captured.dynamic_seq)


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    from ..rewrite import copy_graph_module
    return copy_graph_module(gm)


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


# ------------------------------------------------------------------------------ ONNX
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


def check_writable(path) -> Path:
    """Fail before the export (20-100 s) if `path` cannot be written. A real write test: root passes
    os.access everywhere (e.g. /proc)."""
    try:
        return output_file(path, flag="output")
    except OutputPathError as exc:
        raise ExportError(str(exc)) from None


class _NoStages:
    """Stages' interface without a bar (the API's default)."""

    @contextlib.contextmanager
    def step(self, _name: str):
        yield


ONNX_STAGES = ["capture (Dynamo)", "rewrite for the plan", "torch.export", "convert to ONNX", "save + check"]

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


def export_onnx(model: nn.Module, example_inputs, path, plan=None, *, dynamic_seq: bool = True,
                opset: int | None = None, optimize: bool = False, kernels: bool = False,
                progress=None) -> OnnxExport:
    """Export the model rewritten for `plan` to ONNX at `path`; returns what was written.
    `model` may be a `CapturedModel` (then `example_inputs` is ignored) to export several plans from one
    capture. `progress`: a `cli.Stages` over ONNX_STAGES (the CLI's bar)."""
    path = check_writable(path)
    stages = progress or _NoStages()
    with quiet_third_party():
        with stages.step("capture (Dynamo)"):
            captured = model if isinstance(model, CapturedModel) else capture_model(
                model, example_inputs, dynamic_seq=dynamic_seq)
        with stages.step("rewrite for the plan"):
            program = capture_rewritten(captured, None, plan, kernels=kernels)
        return _export_rewritten(program, path, opset, optimize, stages)


def _export_rewritten(program: RewrittenProgram, path: Path, opset, optimize: bool, stages) -> OnnxExport:
    dynamic_seq = program.dynamic_seq
    seq = torch.export.Dim(SEQ_DIM_NAME, min=2, max=1 << 20)
    dynamic = {name: ({1: seq} if dynamic_seq and t.dim() > 1 else {})
               for name, t in zip(program.input_names, program.example_args)}
    module = _named_forward(program.module, program.input_names)
    num_outputs = len(module(*program.example_args))
    output_names = ["logits"] + [f"output_{i}" for i in range(1, num_outputs)]
    kwargs = {} if opset is None else {"opset_version": opset}
    with torch.no_grad():
        with stages.step("torch.export"):
            exported, decomposed = _export_program(module, program.example_args, dynamic)
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


def _export_program(module: nn.Module, args: tuple, dynamic_shapes: dict):
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
            raise ExportError(f"custom op {missing[0]} has no decomposition into standard ops, so it cannot be "
                              "exported to ONNX; register one with ic_compile.export.onnx.register_decomposition("
                              f"'{missing[0]}', fn)")
        exported = exported.run_decompositions({op: DECOMPOSITIONS[name] for op, name in custom.items()})
    return exported, sorted(set(custom.values()))


def _named_forward(module: RewrittenModule, names: list[str]) -> nn.Module:
    """A module whose forward has named parameters (torch.export maps dynamic_shapes by name)."""
    params = ", ".join(names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.inner({params})\n", namespace)
    cls = type("IndexCacheExport", (nn.Module,), {"forward": namespace["forward"]})
    wrapper = cls()
    wrapper.inner = module
    return wrapper.eval()


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
    size (prefill, T = S; "seq + k" for the -inf padded scores of the ic::indexer_topk decomposition). A MoE router's TopK ranks experts (a static size); a sort of
    routed tokens (exported as TopK too) has a single axis of size k*B*S."""
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


# ------------------------------------------------------------------------------ CLI
def register_cli(subparsers) -> None:
    from ..cli import add_model_arguments, examples
    parser = subparsers.add_parser(
        "export", help="export the rewritten model (S indexers removed) to ONNX or TensorRT",
        description="Export the model rewritten for --plan: S-layer indexers are absent, custom ops are "
                    "decomposed into standard ONNX ops, the sequence axis is dynamic. Takes 20-100 s on CPU.",
        epilog=examples("ic export --model dsa:tiny --plan FSSF --seq 24 --out dsa_fssf.onnx",
                        "ic export --model hf-tiny:glm_moe_dsa --plan plan.json --out glm.onnx --json",
                        "ic export --model ckpt:runs/small --plan FSSSFS --format tensorrt --out small.ep"))
    add_model_arguments(parser)
    parser.add_argument("--plan", default=None, help="pattern (FSSF...), plan.json, or omit for all F")
    parser.add_argument("--format", default="onnx", choices=FORMATS, help="onnx, or a TensorRT engine")
    parser.add_argument("--out", required=True,
                        help="output file (model.onnx / model.ep); checked before the export starts")
    parser.add_argument("--static-seq", action="store_true", help="no dynamic sequence axis")
    parser.add_argument("--kernels", action="store_true",
                        help="ONNX: lower F indexers to ic::indexer_topk first (exported in standard ops)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    from ..cli import Stages, example_ids, forward_inputs, print_json
    from ..tools.models import load_model
    output_file(args.out)  # before the 20-100 s of work
    names = ["load model"] + (ONNX_STAGES if args.format == "onnx" else ["capture, rewrite, build engine"])
    with Stages(names, f"ic export ({args.format})") as stages:
        with stages.step("load model"):
            model = load_model(args.model, args.seed)
            inputs = forward_inputs(model, example_ids(model, args))
        if args.format == "onnx":
            result = export_onnx(model, inputs, args.out, plan=args.plan, dynamic_seq=not args.static_seq,
                                 kernels=args.kernels, progress=stages)
        else:
            from .tensorrt import export_tensorrt
            with stages.step("capture, rewrite, build engine"), quiet_third_party():
                result = export_tensorrt(model, inputs, args.out, plan=args.plan, dynamic_seq=not args.static_seq)
    print_json(result.to_dict()) if args.json else print(result)
    return 0


__all__ = ["CapturedModel", "DECOMPOSITIONS", "ExportError", "FORMATS", "OnnxExport", "RewrittenModule",
           "RewrittenProgram", "capture_model", "capture_rewritten", "count_topk", "decompose_custom_ops",
           "export_onnx", "register_decomposition"]
