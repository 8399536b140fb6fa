"""Triton availability, dispatch policy and the CPU-interpreter twin of a kernel.

Dispatch policy (shared by all public kernel functions, argument ``use_triton``):
  * ``use_triton=None`` (default): Triton when Triton is importable and the inputs are on
    CUDA, the pure-torch reference otherwise. The environment variable
    ``IC_KERNELS_TRITON`` overrides the default: ``1`` = always Triton (CPU tensors run in the
    Triton interpreter), ``0`` = always the reference.
  * ``use_triton=True``: force the Triton path. CPU tensors run through the Triton
    *interpreter* (no GPU needed) -- this is how the tests exercise the kernels on CPU.
  * ``use_triton=False``: force the reference.

Why an explicit interpreter twin instead of relying on ``TRITON_INTERPRET=1``: triton reads
that variable when ``@triton.jit`` decorates a function -- including its own standard library
(tl.sum, tl.cdiv, ...) when ``triton`` is first imported -- so setting it in a test module only
works if nothing imported triton before, and it leaks into every kernel decorated afterwards
(e.g. Inductor-generated ones on a GPU box). Instead every kernel here is a plain function
``fn`` from which we build ``triton.jit(fn)`` (real GPU) and ``InterpretedFunction(fn)``
(CPU, see ``launch_interpreted``); the latter is chosen per call for CPU tensors (or when
TRITON_INTERPRET=1 is set globally). While an interpreted launch runs, calls to (non
interpreted) ``@triton.jit`` helpers such as ``tl.sum`` are routed to their interpreted
version; outside of that, ``JITFunction.__call__`` keeps its normal behaviour (raising).
No environment variable is needed, none is set.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # CPU-only installs may not ship triton: everything falls back to the references.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for kernel modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    HAS_TRITON = False


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def use_triton_for(x: torch.Tensor, use_triton: bool | None) -> bool:
    """Resolve the ``use_triton`` argument for inputs living where ``x`` lives."""
    if use_triton is not None:
        if use_triton and not HAS_TRITON:
            raise RuntimeError("use_triton=True but triton is not importable")
        return bool(use_triton)
    env = os.environ.get("IC_KERNELS_TRITON", "")
    wanted = (env == "1") if env in ("0", "1") else x.is_cuda
    return wanted and HAS_TRITON


def interpreting(x: torch.Tensor) -> bool:
    """Run the interpreter twin? (CPU tensors, or TRITON_INTERPRET=1 set globally)."""
    return (not x.is_cuda) or os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def interpreted(fn):
    """The Triton-interpreter version of kernel function ``fn`` (runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def jit_helper(fn):
    """triton.jit for @-decorated helpers called from kernels (the function itself without triton;
    interpreted launches route JIT helpers to the interpreter, see _jit_helpers_interpreted)."""
    return triton.jit(fn) if HAS_TRITON else fn


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
# kernel before it in the stream is finishing, so its launch and first weight reads overlap that
# kernel's tail instead of following it. Such a kernel reads nothing another kernel wrote, and
# writes nothing, before `wait_for_previous_kernel`; `let_next_kernel_launch` after its main loop
# lets the next kernel start (everything before us is complete by then, as Inductor's PDL kernels
# assume). The decode kernels that stream weights (multi_linear, the MoE experts) and the router use it.
# Off: measured slower in a CUDA graph, with the prefetch and without it (docs/benchmarks.md).
_PDL = False  # private switch (bench/decode_chain.py; bench/e2e.py --with pdl / kernel_pdl)
_PDL_PREFETCH = True  # with PDL: prefetch the weight rows into L2 before the wait (bench/decode_chain.py A/B)
_LINE_BYTES = 128  # an L2 line


def pdl(device: torch.device) -> bool:
    """Launch the decode kernels on this device with programmatic dependent launch?"""
    return _PDL and HAS_TRITON and device.type == "cuda" and _has_grid_dependency_control(device.index)


@functools.lru_cache(maxsize=None)
def _has_grid_dependency_control(index: int | None) -> bool:
    """Hopper or later, and a triton with the gdc ops (asked once per device: called at every launch)."""
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def pdl_launch(device: torch.device, prefetch: bool = False) -> dict:
    """Launch kwargs and the kernels' PDL constexpr; prefetch: a kernel with a PREFETCH constexpr
    (prefetch its weight rows into L2 before the wait)."""
    on = pdl(device)
    flags = {"PDL": on, "launch_pdl": True} if on else {"PDL": False}
    return {**flags, "PREFETCH": on and _PDL_PREFETCH} if prefetch else flags


def line_elems(t: torch.Tensor) -> int:
    """Elements of t's dtype in one L2 line (prefetch_rows_to_l2's LINE_ELEMS)."""
    return _LINE_BYTES // t.element_size()


@jit_helper
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel before this one completed (its writes visible). Without:
    nothing (the launch itself waited)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@jit_helper
def let_next_kernel_launch(PDL: tl.constexpr):
    """With PDL: the next kernel may launch now (it waits for this one's completion before it reads
    our output). Called after the main loop, not at the start: launched early, the next kernel's
    programs would sit on the SMs (registers, shared memory) this kernel's later programs need."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@jit_helper
def prefetch_rows_to_l2(rows, K, LINE_ELEMS: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for every line of the K-element rows starting at `rows` ([R] pointers, unit stride
    along K): a hint, nothing waits for it; evict_last, so the weights streamed by the kernel
    before do not push them out first."""
    for k0 in range(0, K, LINE_ELEMS * LINES):
        k = tl.minimum(k0 + tl.arange(0, LINES) * LINE_ELEMS, K - 1)  # [LINES]; K - 1: the last, partial line
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l",
                                  [rows[:, None] + k[None, :]], dtype=tl.int32, is_pure=False, pack=1)


def launch_config(kernel, grid, args: tuple, consts: dict, config) -> None:
    """Launch jitted ``kernel`` with one ``triton.Config`` (no autotune; the bench sweeps)."""
    kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _interpreter_index_compat() -> None:
    """Triton 3.6's interpreter converts a tensor used as a Python int (e.g. a loop bound computed
    from program_id) with int(data), which fails for the 1-element arrays it holds; 3.9 squeezes
    first. Install 3.9's conversion once (it runs inside each launch's restorable patch scope)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "ic_index_compat", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.ic_index_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


@contextlib.contextmanager
def _jit_helpers_interpreted():
    """Route ``JITFunction.__call__`` (normally: raise "outside of the scope of a kernel") to
    the interpreter for the duration of an interpreted launch, so tl.sum & co. work even when
    triton was imported without TRITON_INTERPRET=1.

    Unlike ``InterpretedFunction.__call__`` (which patches triton.language on every helper
    call and never restores it), triton.language and triton.language.core are patched once for
    the whole launch (re-patching per helper call cost ~1.5 ms each) and restored afterwards, so
    real compilation keeps working in the same process."""
    import types

    from triton.runtime.interpreter import InterpreterError, _patch_lang
    from triton.runtime.jit import JITFunction

    _interpreter_index_compat()
    original = JITFunction.__call__

    def call_interpreted(self, *args, **kwargs):
        try:
            return interpreted(self.fn).rewrite()(*args, **kwargs)
        except Exception as e:
            raise InterpreterError(repr(e)) from e

    # _patch_lang only reads fn.__globals__: patch every language module a helper can see.
    scope = _patch_lang(types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core}))
    JITFunction.__call__ = call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = original
        scope.restore()


def launch_interpreted(fn, grid, *args, **kwargs) -> None:
    """Run kernel function ``fn`` over ``grid`` in the Triton interpreter (CPU tensors OK)."""
    with _jit_helpers_interpreted():
        interpreted(fn)[grid](*args, **kwargs)


# Tests set this to True: every buffer a kernel is expected to overwrite fully starts out as
# garbage (NaN / a sentinel int), so a missed write shows up as a wrong result.
POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs (poisoned when POISON_OUTPUTS is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else 0x5EAD)
    return out


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so split paths are still exercised


def upcast_dots(x: torch.Tensor) -> bool:
    """The interpreter's tl.dot multiplies bf16 *bit patterns* (numpy has no bf16), so when
    interpreting 16-bit inputs the kernels cast dot operands to fp32 first. That is exact:
    bf16 values are fp32 values and MMA accumulates in fp32 -- i.e. what the GPU computes."""
    return interpreting(x) and x.dtype in (torch.bfloat16, torch.float16)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 dots (top-k must not flip on tf32 rounding); bf16/fp16 use
    tensor cores either way ("tf32" is triton's default and is ignored for 16-bit inputs)."""
    return "ieee" if dtype == torch.float32 else "tf32"
