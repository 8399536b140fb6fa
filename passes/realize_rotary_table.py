"""The rotary table's cos / sin computed once per graph, not inside every layer's RoPE kernel (Inductor).

HF models compute cos / sin(position * inv_freq) once per forward (the model's rotary_emb) and every
attention layer (and DSA indexer) applies them. Inductor inlines cheap pointwise producers into each
consumer instead of storing them (a reused buffer is stored only when it reads many inputs), so every
layer's fused RoPE kernel recomputes the trig. At far positions that is not cheap: inv_freq[0] = 1, and
above |x| ~ 1e5 rad CUDA's precise sinf / cosf leave their fast range reduction for the slow one. One
layer's RoPE at position 200000: 4.94 us with the trig inside vs 2.50 with the table given (2.79 /
2.51 at position 100; H100, bench/rope_decode.py); GLM-4.7-Flash's decode step runs 2-3 such kernels
per layer.

The pass: a cos / sin node whose value - through a single-user chain of casts and multiplies by a
constant (HF: `emb.cos() * attention_scaling`, `.to(x.dtype)`) - has two or more users gets Inductor's
realize op (`torch.ops._inductor_test.realize`: the buffer is computed by one kernel and stored, its
users read it) at the end of that chain. Only graphs Inductor compiles (lowering="inductor"); a table
computed per layer (one user each) is left fused. Where the realize op is missing (another torch), the
pass does nothing and says so once in the log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import fx

from .graph_ops import example_value, op_name, take_location

if TYPE_CHECKING:
    from .manager import PassContext

log = logging.getLogger("ic_compile.passes")

_TRIG = {"cos", "sin"}
_CHAIN = {"to", "type", "float", "bfloat16", "half", "type_as", "mul"}  # what HF applies to the table


def realize_rotary_table(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """The pass: the end of each shared cos / sin chain -> realize(that) (ctx.counters
    "realize_rotary_table.realized")."""
    realize = _realize_op()
    if realize is None:
        return gm
    for node in list(gm.graph.nodes):
        if op_name(node) not in _TRIG:
            continue
        table = _chain_end(node)
        if len(table.users) < 2 or not isinstance(example_value(table), torch.Tensor):
            continue
        with gm.graph.inserting_after(table):
            stored = gm.graph.call_function(realize, (table,))
        take_location(stored, table)
        stored.meta.update({k: v for k, v in table.meta.items() if k in ("example_value", "val", "tensor_meta")})
        table.replace_all_uses_with(stored, delete_user_cb=lambda user: user is not stored)
        ctx.counters["realize_rotary_table.realized"] += 1
    return gm


def _chain_end(node: fx.Node) -> fx.Node:
    """Follow `node`'s single user while it is a cast or a multiply by a constant of it."""
    while len(node.users) == 1:
        (user,) = node.users
        name = op_name(user)
        if name == "mul":  # either order; a product with another tensor is no longer the table
            if [a for a in user.args if isinstance(a, fx.Node)] != [node]:
                break
        elif name not in _CHAIN or not user.args or user.args[0] is not node:
            break
        node = user
    return node


_missing_logged = False


def _realize_op():
    """Inductor's realize op (registered with its lowerings), or None where this torch lacks it."""
    global _missing_logged
    import torch._inductor.lowering  # noqa: F401  registers torch.ops._inductor_test.realize
    try:
        return torch.ops._inductor_test.realize.default
    except (AttributeError, RuntimeError):
        if not _missing_logged:
            log.info("realize_rotary_table: torch %s has no _inductor_test.realize; rotary tables stay fused",
                     torch.__version__)
            _missing_logged = True
        return None
