"""Custom ops in standard torch ops, for the exporters (ONNX, TensorRT): `DECOMPOSITIONS` maps each
op's qualified name (`ic::indexer_topk`, `ic::indexer_topk_scored`, `ic::sparse_attention`, `ic::sparse_mla`, HF's
`transformers::grouped_mm_fallback`) to a function of the same arguments that uses standard ops only.

    decompose_custom_ops(gm)                      # calls in an FX graph, in place
    register_decomposition("ns::op", fn)          # teach the exporters another custom op

Calls that only appear while tracing (a helper such as `lowered_indexer` calling
`torch.ops.ic.indexer_topk`) are replaced through `ExportedProgram.run_decompositions`
(`ic_compile.export.program.export_program`).

One maths per op: the kernels' pure-torch references (kernels/reference.py, also the tests' oracle
and the CPU fallback), called on all queries at once. What the references add around these bodies
does not export: their query-chunk loop (`for s0 in range(0, S, chunk)`, chunk from the symbolic
S and T) would fix the trip count to the traced length; topk_indices_from_scores' `min(topk, T)` /
`if kk < topk` on the key count would guard the graph to one side of T = topk; and
indexer_scores_ref's in-place relu_ (it bounds the CPU reference's peak memory) is rejected by
run_decompositions ("aot_autograd expected to have an entirely functional graph").
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from ic_compile.kernels.reference import mask_indexer_scores, moe_route_ref, sparse_attention_rows

from ..errors import IndexCacheError


class ExportError(IndexCacheError, ValueError):
    """The model cannot be exported as asked; the message says why and what to do. (Defined here, in
    the exporters' lowest module, so that every exporter module can raise it.)"""


def _indexer_topk(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True,
                  indexer_precision="bf16", new_keys=None, new_key_pos=None, k_scale=None):
    """ic::indexer_topk in standard ops (no loops, symbolic S/T): q [B,S,H,D], k [B,T,D], w [B,S,H]
    -> int32 [B,S,topk], -1 where fewer than topk keys are allowed (kernels/reference.py's scores).
    key_range is read as ranges without the op's contiguity check (the export lowers with
    indexer_mask="dense", so exported models hand this the mask). k_scale [B,T]: scores times it."""
    return _indexer_topk_scored(q, k, w, topk, mask, causal, sorted, key_range, check, indexer_precision,
                                new_keys, new_key_pos, k_scale)[0]


def _indexer_topk_scored(q, k, w, topk, mask=None, causal=True, sorted=True, key_range=None, check=True,
                         indexer_precision="bf16", new_keys=None, new_key_pos=None, k_scale=None):
    """ic::indexer_topk_scored in standard ops: (the indices of _indexer_topk, their fp32 scores,
    -inf in -1 slots)."""
    if indexer_precision != "bf16" or new_keys is not None:
        raise ExportError(f"indexer_precision={indexer_precision!r} (and its fp8 key cache) is not exported: "
                          "export with the model's precision (indexer_precision='bf16')")
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())  # indexer_scores_ref, relu out of place
    scores = torch.einsum("bsht,bsh->bst", logits.relu(), w.float())
    if k_scale is not None:
        scores = scores * k_scale.float()[:, None, :]
    scores = mask_indexer_scores(scores, q.shape[1], mask, causal, key_range)  # [B, S, T]
    # pad with topk -inf columns so that topk(k) is valid for any T (the pads come back as -1)
    scores = torch.nn.functional.pad(scores, (0, topk), value=float("-inf"))
    values, index = scores.topk(topk, dim=-1)
    return torch.where(values == float("-inf"), torch.full_like(index, -1), index).to(torch.int32), values


def _sparse_attention(q, k, v, indices, scale, causal=True):
    """ic::sparse_attention in standard ops: q [B,S,Hq,D], k [B,T,Hk,D], v [B,T,Hk,Dv], indices [B,S,K]."""
    return sparse_attention_rows(q, k, v, indices, scale, causal)


def _sparse_mla(q, kv, indices, scale, dv, causal=True, rope=None, q_rope=None):
    """ic::sparse_mla in standard ops: q [B,S,H,Dl+Dr], kv [B,T,Dl+Dr], indices [B,S,K] -> [B,S,H,dv]
    (kv as one key/value head, values its first dv channels, as kernels/reference.sparse_mla_ref).
    rope [B,T,Dr]: kv is the latent [B,T,Dl] alone, concatenated with it here (as the lowering did
    before it handed the op the two apart)."""
    if rope is not None:
        kv = torch.cat((kv, rope), dim=-1)  # [B,T,Dl+Dr]
    if q_rope is not None:
        q = torch.cat((q, q_rope), dim=-1)  # [B,S,H,Dl+Dr]
    return sparse_attention_rows(q, kv[:, :, None, :], None, indices, scale, causal, dv=dv)


def _grouped_mm(input, weight, offs):
    """transformers::grouped_mm_fallback (rows sorted by expert, offs = cumulative row ends) in standard
    ops: every expert on every row, then each row picks its expert (E x the FLOPs; export-only)."""
    rows = torch.arange(input.shape[0], device=input.device)
    expert = (rows[:, None] >= offs[None, :].to(rows.dtype)).sum(-1).clamp_max(weight.shape[0] - 1)
    every = torch.einsum("si,eio->seo", input, weight)  # [rows, E, out]
    index = expert[:, None, None].expand(-1, 1, weight.shape[2])
    return every.gather(1, index).squeeze(1)


def _moe_route(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """ic::moe_route in standard ops: the reference (HF's own routing code)."""
    return moe_route_ref(logits, bias, top_k, n_group, topk_group, renormalize, scale)


DECOMPOSITIONS: dict[str, Callable] = {
    "ic::indexer_topk": _indexer_topk,
    "ic::indexer_topk_scored": _indexer_topk_scored,
    "ic::sparse_attention": _sparse_attention,
    "ic::sparse_mla": _sparse_mla,
    "ic::moe_route": _moe_route,
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
            raise no_decomposition_error(name, f" (node {node.name!r})")
        node.target = DECOMPOSITIONS[name]
        replaced.append(name)
    if replaced:
        gm.recompile()
    return replaced


def no_decomposition_error(name: str, where: str = "") -> ExportError:
    """The error for a custom op (at `where`) that has no decomposition."""
    return ExportError(f"custom op {name}{where} has no decomposition into standard ops, so it cannot be "
                       "exported to ONNX; register one with "
                       f"ic_compile.export.decompose.register_decomposition('{name}', fn)")


__all__ = ["DECOMPOSITIONS", "ExportError", "STANDARD_NAMESPACES", "custom_op_name", "decompose_custom_ops",
           "register_decomposition"]
