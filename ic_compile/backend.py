"""The `indexcache` torch.compile backend.

    torch.compile(model, backend="indexcache", options={"plan": "FSSS...", "lowering": "inductor"})

Dynamo hands us its FX graph; `rewrite` makes S layers read their F layer's top-k and deletes their
indexer work; the result is lowered by Inductor (default) or run as is ("eager").

A model with graph breaks reaches us as several graphs (fragments). Each is bound to the plan by its
indexers' module paths over the whole model (`frames.frame_layout`); an S layer whose F source ran
in an earlier fragment reads that top-k from the per-model index store (`index_store`).
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from .errors import IndexCacheError
from ic_compile.kernels.reference import INDEXER_PRECISIONS
from ic_compile.passes.lower_indexer import INDEXER_MASKS, prefill_indexers, skip_host_checks

from .frames import (RecompileLimitError, RecompileLimitWarning, allow_fragment_recompiles,  # noqa: F401
                     frame_layout, note_plan_frame, pin_frame_to_module)
from .index_store import IndexStoreError, store_for, with_store  # noqa: F401 (IndexStoreError re-exported)
from .rewrite import NoIndexerFoundError, RewriteResult, rewrite

# Lowerings beyond Inductor and eager register themselves here (ic_compile.export.tensorrt adds
# "tensorrt" when ic_compile is imported), so the core never imports an exporter.
# name -> (compile(gm, example_inputs) -> callable, whether it runs our ic:: custom ops)
_REGISTERED: dict[str, tuple[Callable, bool]] = {}


def register_lowering(name: str, compile_fn: Callable, *, custom_ops: bool) -> None:
    """Make options={"lowering": name} compile the rewritten graph with compile_fn(gm, example_inputs).
    custom_ops=False: the lowering cannot run ic::indexer_topk & co, so F indexers stay unlowered."""
    _REGISTERED[name] = (compile_fn, custom_ops)


def lowerings() -> tuple[str, ...]:
    return ("inductor", "eager", *_REGISTERED)


def _runs_custom_ops(lowering: str) -> bool:
    return lowering not in _REGISTERED or _REGISTERED[lowering][1]


_warned_no_plan = False
# What the backend did to the graphs it compiled most recently, newest last. Bounded: each entry holds a
# compiled GraphModule, and a long-running server must not keep every graph it ever compiled.
last_results: deque[RewriteResult] = deque(maxlen=64)


class OptionsError(IndexCacheError, ValueError):
    """A torch.compile(..., backend="indexcache", options=...) value ic-compile does not accept."""


class VerificationError(IndexCacheError):
    """`verify=True` found the rewritten graph disagreeing with the original beyond tolerance."""


@dataclass
class BackendOptions:
    plan: Any = None  # "FSSF" | LayerPlan | path.json | {"freq": n, "offset": m} | None (all F)
    lowering: str = "inductor"
    verify: bool = False  # run the original graph beside the rewritten one on the first call
    strict: bool = False  # raise instead of warning when detection is unsure
    kernels: Any = "auto"  # lower F indexers to ic::indexer_topk: True | False | "auto" (= inputs on CUDA)
    sparse_attention: bool = True  # with kernels: mask-scatter + SDPA -> ic::sparse_mla / ic::sparse_attention
    moe_experts: bool = True  # with kernels: a decode graph's MoE experts (+ shared expert) -> ic::moe_experts
    moe_router: bool = True  # with kernels: a sigmoid group-limited router's tail -> ic::moe_route (passes/lower_moe_router)
    # with kernels: a decode graph's linears of one input (and lone one-token GEMVs) -> ic::multi_linear,
    # an RMSNorm read by one such call alone folded into it
    merge_linears: bool = True
    # with kernels: the mask reaches ic::indexer_topk as key ranges | "dense" | "auto" (decided per
    # graph by passes.lower_indexer.decide_indexer_mask: ranges under Inductor except in decode graphs)
    indexer_mask: str = "auto"
    # with kernels: "fp8" runs F indexers as DeepSeek-V3.2's fp8 indexer (q, k quantised to e4m3 per
    # token, e4m3 dots, scores x key scale; what vLLM/SGLang run): faster, selects 96-99 % of the bf16
    # top-k. "bf16" (default): the model's own precision. Off by default: a model trained with a bf16
    # indexer would otherwise change its answers.
    indexer_precision: str = "bf16"
    # Inductor's CUDA-graph trees (what mode="reduce-overhead" turns on for the default backend):
    # each graph is recorded once per distinct shape and replayed, removing the per-kernel launch
    # cost that bounds decode. Inputs mutated in place (KV caches) must be static addresses: HF's
    # StaticCache marks them when allocated outside a compiled graph. Graphs with a prefill-sized
    # indexer are not captured (see _graphable). (Not cudagraph_skip_dynamic_graphs: HF's decode
    # graph has symbolic sizes, and Inductor would then partition every op that uses them, our ops
    # included, out of the graphs.)
    cudagraphs: bool = False
    rtol: float | None = None  # verify tolerances; by dtype when None
    atol: float | None = None

    @classmethod
    def parse(cls, options: dict | None) -> "BackendOptions":
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise OptionsError(f"unknown indexcache option(s) {unknown}; valid options are "
                            f"{sorted(cls.__dataclass_fields__)}")
        parsed = cls(**options)
        if parsed.lowering not in lowerings():
            raise OptionsError(f"lowering={parsed.lowering!r} is not one of {lowerings()}")
        if parsed.indexer_mask not in INDEXER_MASKS:
            raise OptionsError(f"indexer_mask={parsed.indexer_mask!r} is not one of {INDEXER_MASKS}")
        if parsed.indexer_precision not in INDEXER_PRECISIONS:
            raise OptionsError(f"indexer_precision={parsed.indexer_precision!r} is not one of {INDEXER_PRECISIONS}")
        if parsed.indexer_precision != "bf16" and (parsed.kernels is False or not _runs_custom_ops(parsed.lowering)):
            raise OptionsError(f"indexer_precision={parsed.indexer_precision!r} runs in our fused indexer op: it "
                            "needs kernels=True or 'auto' (and lowering 'inductor' or 'eager'), got "
                            f"kernels={parsed.kernels!r}, lowering={parsed.lowering!r}")
        if parsed.cudagraphs and parsed.lowering != "inductor":
            raise OptionsError(f"cudagraphs=True needs lowering='inductor' (got {parsed.lowering!r}): the CUDA "
                            "graphs are Inductor's")
        return parsed


def indexcache_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_ignored):
    opts = BackendOptions.parse(options)
    use_kernels = opts.kernels if opts.kernels != "auto" else _on_cuda(example_inputs)
    if use_kernels and _needs_gradients(example_inputs):
        _warn_kernels_off(opts.kernels, _WITH_GRADIENTS)
        use_kernels = False
    if use_kernels and _under_autocast(gm, example_inputs):
        _warn_kernels_off(opts.kernels, _UNDER_AUTOCAST)
        use_kernels = False
    result = rewrite(gm, opts.plan, strict=opts.strict, kernels=bool(use_kernels) and _runs_custom_ops(opts.lowering),
                     sparse_attention=opts.sparse_attention, moe_experts=opts.moe_experts,
                     moe_router=opts.moe_router, merge_linears=opts.merge_linears,
                     indexer_mask=opts.indexer_mask, indexer_precision=opts.indexer_precision, layout=frame_layout(),
                     lowering=opts.lowering, example_inputs=example_inputs)
    last_results.append(result)
    _check_found(result, opts)
    _keep_frame_bound(result)
    graphed = opts.cudagraphs and _graphable(result)
    if graphed:
        skip_host_checks(result.gm)
    compiled = lower(result.gm, [*example_inputs, *_store_inputs(result)], opts.lowering, cudagraphs=graphed)
    if _uses_store(result):
        return _with_index_store(compiled, result, opts, copy=graphed)
    if opts.verify and result.changed:
        return _verifying(_PlanReference(gm, result), compiled, opts)
    return compiled


def _keep_frame_bound(result: RewriteResult) -> None:
    """Dynamo must neither run this frame's original code (past the recompile limit: the model
    without the plan) nor reuse a layer fragment's graph, rewritten for that layer's role, for
    another layer of the same class."""
    if result.changed:
        note_plan_frame(f"plan {result.plan}, layers {[b.match.layer for b in result.bindings]}")
    if result.fragment is not None:
        allow_fragment_recompiles()
        if result.layout.prefix:
            pin_frame_to_module()


def _with_index_store(compiled: Callable, result: RewriteResult, opts: BackendOptions, copy: bool) -> Callable:
    if opts.verify:
        warnings.warn("indexcache: verify=True does not check graph fragments that read or write the "
                      f"index store (layers {result.fragment.layers}): their original graph computes the S "
                      "layer's own top-k. Check the model with ic_compile.reference.shared_indexer_hooks.",
                      stacklevel=3)
    store = store_for(result.layout.model, str(result.plan))
    return with_store(compiled, store, result.fragment.reads, result.fragment.writes, copy=copy)


def _uses_store(result: RewriteResult) -> bool:
    """Does this fragment read or write top-k across graphs? (verify=True does not cover these:
    its reference is the fragment's original graph, which computes the S layer's own top-k.)"""
    return result.fragment is not None and bool(result.fragment.reads or result.fragment.writes)


def _store_inputs(result: RewriteResult) -> list:
    """Example values (fake tensors with the graph's symbolic sizes) for the inputs the store fills."""
    return [n.meta["example_value"] for n in result.gm.graph.nodes
            if n.op == "placeholder" and n.name.startswith("ic_index_store_")] if _uses_store(result) else []


def _needs_gradients(example_inputs) -> bool:
    """Is this graph compiled for autograd (grad mode on, an input requiring grad)? Dynamo guards on
    grad mode, so an inference call (no_grad / inference_mode) gets its own graph."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


# The reasons a graph runs without our kernels, each warned once per process with what to do.
_WITH_GRADIENTS = ("is compiled with gradients on; our kernels (ic::*) have no backward, so it runs the plan with "
                   "the model's own ops. Run inference under torch.no_grad() or torch.inference_mode() to get the "
                   "kernels.")
_UNDER_AUTOCAST = ("runs under torch.autocast; our kernels (ic::*) compute in their inputs' dtypes and have no "
                   "autocast rules, so it runs the plan with the model's own ops. Cast the model instead "
                   "(model.to(torch.bfloat16)) to get the kernels.")
_warned_kernels_off: set[str] = set()


def _warn_kernels_off(asked, why: str) -> None:
    if why not in _warned_kernels_off:
        _warned_kernels_off.add(why)
        warnings.warn(f"indexcache: kernels={asked!r}, but this graph {why}", stacklevel=3)


def _under_autocast(gm: fx.GraphModule, example_inputs) -> bool:
    """Does this graph run with autocast on: the caller's (Dynamo guards on it, so a call without
    autocast gets its own graph) for an input's device, or one the model enters itself?"""
    devices = {x.device.type for x in example_inputs if isinstance(x, torch.Tensor)} | {"cpu", "cuda"}
    if any(torch.amp.is_autocast_available(d) and torch.is_autocast_enabled(d) for d in devices):
        return True
    return any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_enter_autocast"
               and len(n.args) > 2 and n.args[2] is True for n in gm.graph.nodes)


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)


def _check_found(result: RewriteResult, opts: BackendOptions) -> None:
    global _warned_no_plan
    if result.passes_through:
        return  # a fragment of a DSA model outside its indexers (embedding, MoE dispatch, head)
    if not result.detection.matches and result.detection.confident:
        if opts.plan is not None:
            raise NoIndexerFoundError(f"plan {str(opts.plan)!r} given but {result.message}. Is this a "
                                      "DSA model? Without an indexer there is nothing to share.")
        warnings.warn(f"indexcache: {result.message}; compiling the graph unchanged", stacklevel=3)
    elif opts.plan is None and result.detection.matches and not _warned_no_plan:
        _warned_no_plan = True
        warnings.warn(f"indexcache: no plan given, all {len(result.detection.matches)} indexer layers "
                      "stay full (nothing is shared). Pass options={'plan': 'FSSS...'}.", stacklevel=3)


def _graphable(result: RewriteResult) -> bool:
    """cudagraphs=True: is this graph to be captured? Not graphs with a prefill-sized indexer: their
    GPU time dwarfs the launch cost graphs remove, and ic::indexer_topk picks its fastest exact path
    (causal tile skipping) from the mask's data with a device sync, which a graph can neither hold
    nor replay for other data. Graphs that are captured (decode) get check=False on their indexers:
    one data-independent path, the same in the uncaptured warm-up (where autotuning happens) and in
    the capture."""
    return not prefill_indexers(result.gm)


_INDUCTOR_PDL = False  # private switch: off, measured slower (docs/benchmarks.md, "tried"; bench/e2e.py --with pdl)
_INDUCTOR_COMBO = False  # private switch: Inductor's combo kernels (bench/e2e.py --with combo_kernels); not measured yet


def graph_patches() -> dict:
    """Inductor's config for a captured (decode) graph: CUDA graphs (what mode="reduce-overhead"
    sets) and, where this torch has it, programmatic dependent launch for Inductor's kernels (each
    may start while the kernel before finishes, reading what that kernel wrote only after a grid
    wait; Inductor checks for a Hopper or later card). Only captured graphs: a launch with it costs
    the host a little more, which graphs replay for free."""
    import torch._inductor.config as inductor_config
    patches = {"triton.cudagraphs": True}
    if _INDUCTOR_PDL and hasattr(inductor_config.triton, "enable_pdl"):
        patches["triton.enable_pdl"] = True
    if _INDUCTOR_COMBO:  # independent small kernels (a layer's RoPE / norm / cache writes) as one launch
        patches["combo_kernels"] = True
    return patches


def inductor_cache_tag() -> str:
    """The user's torch.compiler cache_key_tag plus a digest of ic_compile's own sources, for the graphs
    we hand Inductor. Its FX graph cache keys a graph by its code, which names our custom ops but not
    their implementation: an entry compiled against another ic_compile would be reused, and fail on a
    changed op schema or run the old kernels. (A training graph's backward compiles later, under the
    user's tag alone.)"""
    return f"{torch.compiler.config.cache_key_tag}|ic_compile:{_source_digest()}"


@functools.cache
def _source_digest() -> str:
    """sha256 (16 hex digits) of the .py files of ic_compile and its passes and kernels packages."""
    import ic_compile
    import ic_compile.kernels
    import ic_compile.passes
    digest = hashlib.sha256()
    for package in (ic_compile, ic_compile.passes, ic_compile.kernels):
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def lower(gm: fx.GraphModule, example_inputs, lowering: str, cudagraphs: bool = False) -> Callable:
    if lowering == "eager":
        return gm.forward
    if lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx
        with torch.compiler.config.patch(cache_key_tag=inductor_cache_tag()):
            return compile_fx(gm, example_inputs, config_patches=graph_patches() if cudagraphs else None)
    compile_fn, _ = _REGISTERED[lowering]
    return compile_fn(gm, example_inputs)


class _PlanReference(fx.Interpreter):
    """The original graph run node by node, each S layer's topk answered by its F source's.

    This is the plan's meaning with no dead-code removal, cache dropping or lowering involved."""

    def __init__(self, gm: fx.GraphModule, result: RewriteResult):
        super().__init__(gm)
        self.source_of = {b.match.topk.name: b.source.topk.name for b in result.bindings if b.role == "S"}
        self.saved: dict[str, Any] = {}  # F topk results (the interpreter frees env entries early)

    def run_node(self, n: fx.Node):
        if n.name in self.source_of:
            return self.saved[self.source_of[n.name]]
        value = super().run_node(n)
        if n.name in self.source_of.values():
            self.saved[n.name] = value
        return value

    def forward(self, *args):
        return self.run(*args)


def _verifying(original, compiled: Callable, opts: BackendOptions) -> Callable:
    checked = False

    def run(*args):
        nonlocal checked
        if checked:
            return compiled(*args)
        checked = True
        expected = original.forward(*[_clone(a) for a in args])
        actual = compiled(*args)
        _compare(expected, actual, opts)
        return actual

    return run


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _compare(expected, actual, opts: BackendOptions) -> None:
    for i, (e, a) in enumerate(zip(tree_leaves(expected), tree_leaves(actual))):
        if not (isinstance(e, torch.Tensor) and e.is_floating_point() and e.shape == a.shape):
            continue
        rtol, atol = _tolerance(e.dtype, opts)
        if not torch.allclose(e.float(), a.float(), rtol=rtol, atol=atol):
            diff = (e.float() - a.float()).abs().max().item()
            raise VerificationError(f"indexcache verify: output {i} {tuple(e.shape)} differs from the "
                                    f"original graph run with the plan by {diff:.3g} "
                                    f"(rtol={rtol}, atol={atol})")


def _tolerance(dtype, opts: BackendOptions) -> tuple[float, float]:
    loose = dtype in (torch.bfloat16, torch.float16)
    return (opts.rtol if opts.rtol is not None else (2e-2 if loose else 1e-3),
            opts.atol if opts.atol is not None else (2e-2 if loose else 1e-4))
