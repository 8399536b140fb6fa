"""kernels/indexer_scores_wgmma.py: the Gluon (async wgmma) prefill score kernel.

Gluon has no CPU interpreter, so here on the CPU the kernel is compiled ahead of time for sm_90 with
the installed triton (as tests/kernels/test_sm90_compile.py does for the Triton kernels) and its code
is checked for what the design needs: each key tile's wgmma left in flight while the previous tile's
epilogue runs (a `wgmma.wait_group 1` in the loop), no register spills, shared memory that fits.
The values are checked on a GPU (marked gpu): the same scores as the Triton kernel and the
reference, every tile form (causal, key ranges, bool masks, fp8 with key scales, chunks, splits).
"""
import re

import pytest
import torch

from ic_compile.kernels import indexer_topk as indexer_mod
from ic_compile.kernels.indexer_scores_wgmma import HAS_GLUON, wgmma_scores_supported
from ic_compile.kernels.key_range import key_range_of
from ic_compile.kernels.testing import indexer_inputs, masked_scores, repro, seed_everything

from marks import needs_cuda
from test_sm90_compile import COMPILER_MODE, HAS_NVIDIA_BACKEND, MAX_SMEM, _resource_usage

needs_gluon_compiler = [
    pytest.mark.skipif(not (HAS_GLUON and HAS_NVIDIA_BACKEND), reason="triton with Gluon and ptxas not available"),
    pytest.mark.skipif(HAS_NVIDIA_BACKEND and not COMPILER_MODE,
                       reason="triton was imported with TRITON_INTERPRET=1: cannot compile in this process"),
]
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
                 torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}


class _Recorder:
    """Stands in for the Gluon kernel's launcher only (no GPU here): keeps the grid and the arguments
    indexer_scores passes, which compile_recorded_launch then compiles for sm_90."""

    def __init__(self, kernel):
        self.kernel = kernel  # the real one, compiled afterwards

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grid, self.args, self.kwargs = grid, args, kwargs
        return launch


def record_launch(monkeypatch, L=1024, H=32, dtype=torch.bfloat16, causal=True, mask=False, key_range=False,
                  kscale=False, config=None, w_dtype=torch.float32, chunk=(0, 1024, 1024)) -> _Recorder:
    """indexer_topk.indexer_scores on CPU tensors [1, L] with the Gluon kernel chosen: what it launches.
    chunk: (row_start, n_rows, width) of the launch, as chunked_scores passes them."""
    from ic_compile.kernels import indexer_scores_wgmma as wgmma

    recorder = _Recorder(wgmma._indexer_scores_wgmma_kernel)
    monkeypatch.setattr(wgmma, "_indexer_scores_wgmma_kernel", recorder)
    monkeypatch.setattr(indexer_mod, "wgmma_scores_supported", lambda q, k, decode: True)
    monkeypatch.setattr(indexer_mod, "_WGMMA_SCORES", True)
    if config:
        monkeypatch.setattr(wgmma, "_CONFIG", {**wgmma._CONFIG, **config})
    q, k, w = indexer_inputs(1, L, L, H, 128, torch.bfloat16)
    q, k = q.to(dtype), k.to(dtype)
    allowed = torch.ones(1, L, L, dtype=torch.bool).tril()
    row_start, n_rows, width = chunk
    out = torch.empty(1, n_rows, width)
    indexer_mod.indexer_scores(q, k, w.to(w_dtype), allowed if mask else None, causal, row_start, n_rows, width, out,
                               key_range=key_range_of(allowed) if key_range else None,
                               k_scale=torch.rand(1, L) if kscale else None)
    return recorder


def compile_recorded_launch(recorder: _Recorder) -> dict:
    """AOT-compile the recorded launch for sm_90 with the JIT's specialisation (ints equal to 1 become
    constants, multiples of 16 and 16-byte-aligned pointers are marked divisible)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = recorder.kernel
    constants, signature, attrs = dict(recorder.kwargs), {}, {}
    values = iter(recorder.args)
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    assert next(values, None) is None, "more arguments than the kernel has parameters"
    warps = constants["num_warps"]
    kernel = triton_compile(GluonASTSource(fn, signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return {"shared": kernel.metadata.shared, "ptx": kernel.asm["ptx"], **_resource_usage(kernel.asm["cubin"])}


@needs_gluon_compiler[0]
@needs_gluon_compiler[1]
@pytest.mark.parametrize("form", [dict(), dict(key_range=True), dict(mask=True), dict(kscale=True),
                                  dict(dtype=torch.float8_e4m3fn, kscale=True), dict(causal=False, key_range=True),
                                  dict(config={"rows": 128, "num_warps": 4}), dict(H=64), dict(config={"STAGES": 3}),
                                  dict(w_dtype=torch.bfloat16), dict(chunk=(512, 256, 768)),
                                  dict(config={"OVERLAP": False})],
                         ids=["causal", "key_range", "bool_mask", "key_scale", "fp8", "range_not_causal",
                              "4_warps", "64_heads", "3_stages", "bf16_weights", "a_later_chunk", "serial"])
def test_launch_compiles_with_the_mma_in_flight_during_the_epilogue(form, monkeypatch):
    """What indexer_scores launches (its real arguments, recorded) compiles for sm_90, keeps each key
    tile's wgmma in flight while the previous tile's epilogue runs, and fits without spills."""
    recorder = record_launch(monkeypatch, **form)
    res = compile_recorded_launch(recorder)
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", res["ptx"])
    overlap = recorder.kwargs["OVERLAP"]
    assert ("1" in waits) == overlap, f"waits {waits}: overlap of MMA and epilogue should be {overlap}"
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    assert 0 < res["regs"] <= 255 and res["shared"] <= MAX_SMEM, res
    k_steps = 128 // (32 if form.get("dtype") == torch.float8_e4m3fn else 16)
    assert res["ptx"].count("wgmma.mma_async") == 2 * k_steps, "two dot sites (prologue, loop) of D / k steps each"
    rows = recorder.kwargs["BLOCK_S"] * recorder.kwargs["H_PAD"]
    n_rows = form.get("chunk", (0, 1024, 1024))[1]
    assert recorder.grid[0] == -(-n_rows // recorder.kwargs["BLOCK_S"]) and rows == form.get("config", {}).get("rows", 256)


def test_not_taken_where_it_cannot_run():
    q, k, _ = indexer_inputs(1, 256, 256, 32, 128, torch.bfloat16)
    assert not wgmma_scores_supported(q, k, decode=False)  # CPU: the Triton kernel (interpreter) runs


# ----------------------------------------------------------------------------- real GPU

def _scores(q, k, w, wgmma: bool, monkeypatch, **kw) -> list[torch.Tensor]:
    """Each query chunk's masked scores (chunks of a causal prefill differ in width)."""
    monkeypatch.setattr(indexer_mod, "_WGMMA_SCORES", wgmma)
    return [scores.clone() for _, _, scores in indexer_mod.chunked_scores(q, k, w, **kw)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", ["causal", "prefix", "odd_length", "key_range", "bool_mask", "fp8", "64_heads",
                                  "chunks_and_splits", "batch", "causal_serial"])
def test_gpu_scores_equal_the_triton_kernel(case, request, monkeypatch):
    """causal_serial: each wgmma waited for at once (OVERLAP off): if only the overlapped form fails,
    the ring / wait protocol is at fault, not the layouts or tile rules."""
    from ic_compile.kernels import indexer_scores_wgmma as wgmma

    seed = seed_everything(request.node.name)
    if case == "causal_serial":
        monkeypatch.setattr(wgmma, "_CONFIG", {**wgmma._CONFIG, "OVERLAP": False})
        case = "causal"
    B, S, T, H, kw = {"causal": (1, 4096, 4096, 32, {}), "prefix": (1, 1000, 5000, 32, {}),
                      "odd_length": (1, 3001, 3001, 32, {}), "key_range": (1, 2048, 2048, 32, {}),
                      "bool_mask": (1, 2048, 2048, 32, {}), "fp8": (1, 4096, 4096, 32, {"indexer_precision": "fp8"}),
                      "64_heads": (1, 2048, 2048, 64, {}),
                      "chunks_and_splits": (1, 3000, 3000, 32, {"chunk_rows": 512, "num_splits": 3}),
                      "batch": (2, 1500, 1500, 32, {"chunk_rows": 1024})}[case]
    q, k, w = indexer_inputs(B, S, T, H, 128, torch.bfloat16, device="cuda")
    if not wgmma_scores_supported(q, k, decode=False):
        pytest.skip("not a Hopper GPU with Gluon")
    if case in ("key_range", "bool_mask"):
        causal = torch.ones(S, T, dtype=torch.bool, device="cuda").tril(T - S)
        window = causal & ~torch.ones_like(causal).tril(T - S - 700)  # sliding window of 700 keys
        if case == "key_range":
            kw["key_range"] = key_range_of(window[None].expand(B, S, T))
        else:
            kw["mask"] = window[None] & (torch.rand(B, 1, T, device="cuda") > 0.1)  # and some keys dropped
    got = _scores(q, k, w, True, monkeypatch, **kw)
    want = _scores(q, k, w, False, monkeypatch, **kw)
    assert len(got) == len(want)
    for g, x in zip(got, want):
        assert torch.equal(torch.isinf(g), torch.isinf(x)), f"masked keys differ {repro(seed)}"
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5, msg=repro(seed))
    if case == "causal":  # one chunk of 4096 rows: and the reference, outright
        ref = masked_scores(q.float(), k.float(), w.float())
        torch.testing.assert_close(got[0], ref, rtol=2e-3, atol=2e-3, msg=repro(seed))


@pytest.mark.gpu
@needs_cuda
def test_gpu_topk_through_the_op_equals_the_triton_kernels(request, monkeypatch):
    seed = seed_everything(request.node.name)
    q, k, w = indexer_inputs(1, 8192, 8192, 32, 128, torch.bfloat16, device="cuda")
    if not wgmma_scores_supported(q, k, decode=False):
        pytest.skip("not a Hopper GPU with Gluon")
    picks = {}
    for wgmma in (False, True):
        monkeypatch.setattr(indexer_mod, "_WGMMA_SCORES", wgmma)
        picks[wgmma] = indexer_mod.indexer_topk(q, k, w, 2048, sorted=False).sort(-1).values
    mismatching = (picks[True] != picks[False]).any(-1).sum().item()
    assert mismatching <= 2, f"{mismatching} rows pick other keys {repro(seed)}"  # near-ties only

