"""forward_indices: each S layer's uses of its topk read the F layer's instead, reusing F's own
getitems; the S indexer's pure post-processing of the top-k merges into F's identical ops."""

import pytest
import torch
from torch import fx

from ic_compile.passes.bind_plan import LayerBinding
from ic_compile.passes.detect_indexers import detect_indexers
from ic_compile.passes.eliminate_dead_code import eliminate_dead_code
from ic_compile.passes.forward_indices import forward_indices
from ic_compile.passes.graph_ops import module_path
from ic_compile.passes.manager import PassContext

from traced import indexer  # tests/passes/traced.py


def f_then_s(q, k, w):
    f = indexer(q, k, w)
    s = indexer(q * 2, k, w)
    # F reads only .indices (cast like HF); S reads .indices the same way and also .values
    return f.indices.to(torch.int32) + 1, s.indices.to(torch.int32) * 2, s.values


# f_then_s's S indexer: its scores, topk, and its own cast of the indices (HF casts inside the indexer)
S_INDEXER_NODES = {"mul_1", "einsum_1", "relu_1", "getitem_1", "mul_2", "sum_2", "topk_1", "getattr_2", "to_1"}


def forwarded(fn, in_modules=True):
    """fn traced; the second indexer bound as S to the first (its nodes in module layers.1.indexer)."""
    gm = fx.symbolic_trace(fn)
    for node in gm.graph.nodes:
        if in_modules and node.name in S_INDEXER_NODES:
            node.meta["nn_module_stack"] = {"s": ("layers.1.indexer", torch.nn.Module)}
    matches = detect_indexers(gm).matches
    ctx = PassContext()
    ctx.bindings = [LayerBinding(matches[0], "F", matches[0]), LayerBinding(matches[1], "S", matches[0])]
    forward_indices(gm, ctx)
    eliminate_dead_code(gm, ctx)
    gm.recompile()
    return gm, ctx, matches


def test_s_reads_the_f_top_k_and_its_indexer_dies():
    gm, ctx, (f, s) = forwarded(f_then_s)
    topks = [n for n in gm.graph.nodes if n.target == "topk"]
    assert topks == [f.topk] and s.topk not in set(gm.graph.nodes)
    assert ctx.counters["forward_indices.shared_topk"] == 1
    q, k, w = torch.randn(1, 3, 2, 4), torch.randn(1, 5, 4), torch.randn(1, 3, 2)
    f_idx, s_idx, s_values = gm(q, k, w)
    want = indexer(q, k, w)
    assert torch.equal(s_idx, want.indices.to(torch.int32) * 2) and torch.equal(s_values, want.values)


def test_f_getitems_are_reused_and_an_item_f_never_read_moves_to_f():
    gm, _, (f, _) = forwarded(f_then_s)
    readers = {(n.args[1], n.op) for n in f.topk.users}
    assert readers == {("indices", "call_function"), ("values", "call_function")}  # one of each, not two
    values = next(n for n in f.topk.users if n.args[1] == "values")
    assert module_path(values) == module_path(f.topk) == ""  # F's op now, not the dead S indexer's


def test_the_s_cast_of_the_top_k_merges_into_f_cast():
    gm, ctx, _ = forwarded(f_then_s)
    casts = [n for n in gm.graph.nodes if n.target == "to"]
    assert len(casts) == 1 and casts[0].name == "to"
    assert ctx.counters["forward_indices.merged_ops"] == 2  # the cast, and S's repeat of F's w[..., None]


def test_ops_outside_the_s_indexer_are_never_merged():
    gm, ctx, _ = forwarded(f_then_s, in_modules=False)
    assert len([n for n in gm.graph.nodes if n.target == "to"]) == 2
    assert ctx.counters["forward_indices.merged_ops"] == 0


def s_then_f(q, k, w):
    s = indexer(q * 2, k, w)
    f = indexer(q, k, w)
    return s.indices, f.indices


def test_a_source_after_its_reader_is_an_error():
    gm = fx.symbolic_trace(s_then_f)
    s, f = detect_indexers(gm).matches
    ctx = PassContext()
    ctx.bindings = [LayerBinding(f, "F", f), LayerBinding(s, "S", f)]
    with pytest.raises(RuntimeError, match="layer 0's source topk comes after it in the graph"):
        forward_indices(gm, ctx)
