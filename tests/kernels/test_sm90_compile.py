"""Ahead-of-time compile of the Triton kernels for Hopper (sm_90) -- no GPU needed.

The interpreter checks semantics but not code generation. Here each kernel is compiled
through the real Triton pipeline (TTIR -> TTGIR -> PTX -> cubin with the ptxas bundled in
the triton wheel) with JIT-like argument specialisation (stride 1 -> constexpr, multiples of
16 -> divisibility), and the cubin is checked: compiles, fits shared memory, tensor-core
instructions as intended, and (where the design allows it) no register spills.
Representative configs run by default; the full autotune sweep is marked slow.
Caveat: this is the local triton's codegen (the target box runs triton 3.6).
A few compiles target sm_80 / sm_89 (A100, L4 / L40S): configs that fit those cards exist.
"""
import importlib.util
import os
import re
import subprocess
import tempfile

import pytest

HAS_NVIDIA_BACKEND = COMPILER_MODE = False
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    HAS_NVIDIA_BACKEND = os.path.exists(os.path.join(BIN, "ptxas"))
    # Imported under TRITON_INTERPRET=1, triton's own tl.* helpers are interpreter objects and
    # real compilation is impossible in this process.
    COMPILER_MODE = isinstance(tl.sum, JITFunction)

pytestmark = [
    pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="triton with its NVIDIA backend (ptxas) not available"),
    pytest.mark.skipif(HAS_NVIDIA_BACKEND and not COMPILER_MODE,
                       reason="triton was imported with TRITON_INTERPRET=1: cannot compile in this process"),
]
MAX_SMEM = 232448  # H100/H200 max dynamic shared memory per block (227 KB)
# The full autotune-config sweep takes minutes on a 2-core box: opt in with IC_RUN_SLOW=1.
slow = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("IC_RUN_SLOW") != "1", reason="set IC_RUN_SLOW=1")]


def compile_sm90(fn, ptrs: dict, ints: dict, floats: dict, consts: dict, num_warps: int, num_stages: int,
                 maxnreg: int | None = None, arch: int = 90) -> dict:
    """Compile kernel function `fn` for sm_90 (or sm_`arch`) with the given example argument values."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit_fn = JITFunction(fn)  # not triton.jit: that returns an interpreter object under TRITON_INTERPRET=1
    signature, constants, attrs = {}, dict(consts), {}
    for i, name in enumerate(jit_fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        elif ints[name] == 1:  # the JIT specialises 1-valued ints (unit strides) to constants
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(jit_fn, signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg})
    return {"shared": kernel.metadata.shared, "ptx": kernel.asm["ptx"], "cubin": kernel.asm["cubin"],
            "ttgir": kernel.asm["ttgir"], **_resource_usage(kernel.asm["cubin"])}


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True).stdout
    fields = dict(tok.split(":") for line in out.splitlines() if "REG:" in line for tok in line.split()[:2])
    return {"regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1))}


def _sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) pairs of the cubin's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    found = (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line) for line in out.splitlines())
    return [(int(m.group(1), 16), m.group(2)) for m in found if m]


def _spills_in_streaming_loops(cubin: bytes) -> list[str]:
    """Local-memory spill instructions (STL/LDL) inside the innermost loops that stream with
    cp.async (LDGSTS): a loop is [target, branch] of a backward branch."""
    sass = _sass(cubin)
    loops = [(int(m.group(1), 16), addr) for addr, ins in sass
             if (m := re.search(r"BRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", ins)) and int(m.group(1), 16) < addr]
    streaming = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and "LDGSTS" in ins for a, ins in sass)]
    streaming = [(lo, hi) for lo, hi in streaming
                 if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2 in streaming)]
    assert streaming, "no cp.async streaming loop found"
    return [ins for a, ins in sass if any(lo <= a <= hi for lo, hi in streaming) and re.search(r"\b(STL|LDL)", ins)]


# ----------------------------------------------------------------------------- indexer

def _compile_indexer(block_s, h_pad, block_t, warps, stages, causal=True, mask=False, S=4096, T=4096,
                     head_major=False, key_rows=False, key_range=False, arch=90):
    from ic_compile.kernels.indexer_topk import _indexer_scores_kernel

    D = 128
    ints = dict(S=S, T=T, H=h_pad, D=D, row_start=0, n_rows=S, width=T, tune_bucket=13,
                sq_b=S * h_pad * D, sq_s=h_pad * D, sq_h=D, sq_d=1, sk_b=T * D, sk_t=D, sk_d=1,
                sw_b=S * h_pad, sw_s=h_pad, sw_h=1, sm_b=0 if mask else 1, sm_s=0 if mask else 1, sm_t=1,
                sr_b=S * 3, sr_s=3, sr_c=1, so_b=S * T, so_s=T, so_t=1)
    ptrs = dict(q_ptr="bf16", k_ptr="bf16", w_ptr="fp32", mask_ptr="u8", range_ptr="i32", out_ptr="fp32")
    consts = dict(BLOCK_S=block_s, H_PAD=h_pad, D_PAD=D, BLOCK_T=block_t, CAUSAL=causal, HAS_MASK=mask,
                  DOT_PRECISION="tf32", UPCAST_DOT=False, HEAD_MAJOR=head_major, KEY_ROWS=key_rows,
                  HAS_RANGE=key_range)
    return compile_sm90(_indexer_scores_kernel, ptrs, ints, {}, consts, warps, stages, arch=arch)


def _check_indexer(res, rows):
    assert res["shared"] <= MAX_SMEM, res["shared"]
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    if rows >= 64:
        assert "wgmma" in res["ptx"], "expected Hopper wgmma for >= 64 dot rows"


@pytest.mark.parametrize("cfg", [dict(block_s=4, block_t=64, warps=4, stages=2),
                                 dict(block_s=8, block_t=64, warps=8, stages=3, mask=True),
                                 dict(block_s=1, block_t=256, warps=8, stages=4),
                                 dict(block_s=4, block_t=64, warps=4, stages=3, head_major=True),
                                 dict(block_s=8, block_t=64, warps=8, stages=3, mask=True, key_rows=True),
                                 dict(block_s=8, block_t=64, warps=8, stages=3, causal=False, key_range=True,
                                      key_rows=True),
                                 dict(block_s=1, block_t=256, warps=8, stages=4, causal=False, key_range=True)],
                         ids=["prefill", "prefill_mask_256rows", "decode", "prefill_head_major", "prefill_key_rows",
                              "prefill_key_range", "decode_key_range"])
def test_indexer_compiles_for_sm90(cfg):
    _check_indexer(_compile_indexer(h_pad=32, **cfg), cfg["block_s"] * 32)


def test_fp8_decode_configs_compile_to_e4m3_wgmma():
    """The fp8 indexer's decode tiles (one query, 32 heads, e4m3 q and keys, the scaled kernel) run on
    Hopper's e4m3 wgmma without spills: keys as the dot's rows. (With [D, BLOCK_T] key tiles, the bf16
    decode form, triton emits mma.sync with conversions and a spill.)"""
    from ic_compile.kernels.indexer_topk import _decode_configs, _indexer_scores_scaled_kernel

    S, T, h_pad, D = 1, 200000, 32, 128
    ints = dict(S=S, T=T, H=h_pad, D=D, row_start=0, n_rows=S, width=T, tune_bucket=13, sq_b=h_pad * D, sq_s=h_pad * D,
                sq_h=D, sq_d=1, sk_b=T * D, sk_t=D, sk_d=1, sw_b=h_pad, sw_s=h_pad, sw_h=1, sks_b=T, sks_t=1,
                sm_b=1, sm_s=1, sm_t=1, sr_b=3, sr_s=3, sr_c=1, so_b=T, so_s=T, so_t=1)
    ptrs = dict(q_ptr="fp8e4nv", k_ptr="fp8e4nv", w_ptr="fp32", ks_ptr="fp32", mask_ptr="u8", range_ptr="i32",
                out_ptr="fp32")
    configs = _decode_configs(fp8=True)
    for cfg in configs if os.environ.get("IC_RUN_SLOW") == "1" else configs[-2:]:
        consts = dict(BLOCK_S=1, H_PAD=h_pad, D_PAD=D, CAUSAL=False, HAS_MASK=False, DOT_PRECISION="tf32",
                      UPCAST_DOT=False, HAS_RANGE=False, **cfg.kwargs)
        res = compile_sm90(_indexer_scores_scaled_kernel, ptrs, ints, {}, consts, cfg.num_warps, cfg.num_stages)
        assert re.search(r"wgmma\.mma_async\S*e4m3", res["ptx"]) and "mma.sync" not in res["ptx"], cfg
        assert res["stack"] == 0 and res["shared"] <= MAX_SMEM, (cfg, res["stack"], res["shared"])


@slow[0]
@slow[1]
def test_indexer_all_configs_compile_for_sm90():
    from ic_compile.kernels.indexer_topk import _decode_configs, _prefill_configs

    for cfg in _prefill_configs(32):
        kw = cfg.kwargs
        _check_indexer(_compile_indexer(kw["BLOCK_S"], 32, kw["BLOCK_T"], cfg.num_warps, cfg.num_stages,
                                        head_major=kw["HEAD_MAJOR"], key_rows=kw["KEY_ROWS"]),
                       kw["BLOCK_S"] * 32)
    for cfg in _decode_configs():
        _check_indexer(_compile_indexer(1, 32, cfg.kwargs["BLOCK_T"], cfg.num_warps, cfg.num_stages), 32)


# ----------------------------------------------------------------------------- sparse attention

def _compile_sparse(block_h, block_k, warps, stages, H=64, dqk=576, dv=512, v_from_k=True, lse=False, arch=90,
                    rope_apart=False):
    """rope_apart: the key's tail in its own [B,T,D_B] buffer (an MLA cache's rope) and the query's in its
    own [B,H,S,D_B] tensor (seen as [B,S,H,D_B]: the lowering's transposed view), else views of k and q."""
    from ic_compile.kernels.sparse_attention import _key_split, _sparse_attention_kernel

    d_a, d_b, d_b_pad = _key_split(dqk)
    S = T = 4096
    K = 2048
    ints = dict(S=S, T=T, Hk=1, G=H, K=K, D_B=d_b, DV=dv,
                sq_b=S * H * dqk, sq_s=H * dqk, sq_h=dqk, sq_d=1, sk_b=T * dqk, sk_t=dqk, sk_h=dqk, sk_d=1,
                sv_b=T * dqk, sv_t=dqk, sv_h=dqk, sv_d=1, si_b=S * K, si_s=K, si_k=1,
                so_b=S * H * dv, so_s=H * dv, so_h=dv, so_split=0, so_d=1, sl_b=0, sl_s=0, sl_h=0, sl_split=0)
    tail_row = d_b if rope_apart else dqk  # the tail's row stride: its own buffer's, or k's
    ints.update(skb_b=T * tail_row, skb_t=tail_row, skb_h=tail_row, skb_d=1)
    if rope_apart:
        ints.update(sqb_b=S * H * d_b, sqb_s=d_b, sqb_h=S * d_b, sqb_d=1)
    else:
        ints.update(sqb_b=S * H * dqk, sqb_s=H * dqk, sqb_h=dqk, sqb_d=1)
    if lse:  # split-K partials [B,S,H,P,dv] fp32 + lse [B,S,H,P] (merged by _combine_splits_kernel)
        ints.update(so_b=H * 16 * dv, so_s=H * 16 * dv, so_h=16 * dv, so_split=dv,
                    sl_b=H * 16, sl_s=H * 16, sl_h=16, sl_split=1)
    ptrs = dict(q_ptr="bf16", qb_ptr="bf16", k_ptr="bf16", kb_ptr="bf16", v_ptr="bf16", idx_ptr="i32",
                o_ptr="fp32" if lse else "bf16", lse_ptr="fp32")
    consts = dict(D_A=d_a, D_B_PAD=d_b_pad, DV_PAD=dv, BLOCK_H=block_h, BLOCK_K=block_k, CAUSAL=True,
                  V_FROM_K=v_from_k, WRITE_LSE=lse, DOT_PRECISION="tf32",
                  UPCAST_DOT=False)
    return compile_sm90(_sparse_attention_kernel, ptrs, ints, dict(scale_log2=1.0), consts, warps, stages, arch=arch)


@pytest.mark.parametrize("cfg", [dict(block_h=64, block_k=32, warps=8, stages=2),
                                 dict(block_h=32, block_k=32, warps=8, stages=2, H=20),
                                 dict(block_h=64, block_k=32, warps=8, stages=2, lse=True),
                                 dict(block_h=32, block_k=32, warps=8, stages=2, H=20, lse=True, rope_apart=True),
                                 dict(block_h=16, block_k=64, warps=4, stages=2, H=16, dqk=192, dv=128,
                                      v_from_k=False)],
                         ids=["mla_h64", "mla_h20", "mla_decode_split", "mla_decode_rope_apart", "gqa_192_128"])
def test_sparse_attention_compiles_for_sm90(cfg):
    res = _compile_sparse(**cfg)
    assert res["shared"] <= MAX_SMEM, res["shared"]
    if cfg.get("dqk", 576) <= 256 or cfg.get("rope_apart"):  # rope apart: the 8-warp H=20 decode config
        assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    if cfg["block_h"] >= 64:
        assert "wgmma" in res["ptx"]
    # Known (MLA, 64 heads): the [64, 512] fp32 accumulator over 2 warpgroups + the gather
    # pointers exceed 255 regs -> ~150-250 B/thread of spills with triton 3.9; recorded, not failed.
    print(cfg, {k: v for k, v in res.items() if k not in ("ptx", "cubin")})


@pytest.mark.parametrize("block_k,stages,buffers", [(32, 3, 2), (32, 4, 3), (64, 3, 2)])
def test_sparse_mla_gathers_are_multi_buffered(block_k, stages, buffers):
    """The software pipeliner gives the gathered key tiles num_stages - 1 shared-memory buffers, so the
    next block's gather overlaps this block's dots. It does so only while the gather's addresses come
    from a loop-carried value (the indices loaded one block ahead): an index load in the same
    iteration left one buffer at any stage count, and gather and dots took turns."""
    res = _compile_sparse(32, block_k, 8, stages, H=20, lse=False, rope_apart=True)
    tiles = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x%dx512xbf16" % block_k, res["ttgir"])
    assert tiles == [str(buffers)], tiles


def test_combine_splits_compiles_for_sm90():
    """The decode combine as launched at 20 heads, 32 splits, 512 value columns: no spills."""
    from ic_compile.kernels.sparse_attention import _combine_splits_kernel

    H, P, dv = 20, 32, 512
    ints = dict(S=1, Hq=H, DV=dv, num_splits=P, so_b=H * P * dv, so_s=H * P * dv, so_h=P * dv, so_split=dv, so_d=1,
                sl_b=H * P, sl_s=H * P, sl_h=P, sl_split=1, sf_b=H * dv, sf_s=H * dv, sf_h=dv, sf_d=1)
    res = compile_sm90(_combine_splits_kernel, dict(o_ptr="fp32", lse_ptr="fp32", out_ptr="bf16"), ints, {},
                       dict(SPLIT_PAD=P, BLOCK_D=64), num_warps=2, num_stages=1)
    assert res["stack"] == 0, f"register spills: {res['stack']} bytes"


@slow[0]
@slow[1]
def test_sparse_attention_all_configs_compile_for_sm90():
    from ic_compile.kernels.sparse_attention import _block_h_candidates, _configs

    for H, dqk, dv in ((64, 576, 512), (20, 576, 512), (16, 192, 128)):
        for cfg in _configs(dqk, _block_h_candidates(H)):
            kw = cfg.kwargs
            res = _compile_sparse(kw["BLOCK_H"], kw["BLOCK_K"], cfg.num_warps, cfg.num_stages, H=H, dqk=dqk, dv=dv,
                                  v_from_k=dv == 512)
            # smem overflow is allowed here: the autotuner prunes such configs (OutOfResources)
            print(H, dqk, kw, cfg.num_warps, cfg.num_stages, {k: v for k, v in res.items() if k != "ptx"})


# Max dynamic shared memory per block: A100 (sm_80) 163 KB, L4 / L40S / RTX 4090 (sm_89) 99 KB.
SMEM_OF_ARCH = {80: 166912, 89: 101376}


@pytest.mark.parametrize("arch", sorted(SMEM_OF_ARCH))
def test_autotune_lists_hold_a_config_that_fits_older_gpus(arch):
    """Never run on a non-Hopper GPU (no such machine here); the autotuner drops configs that do
    not fit (OutOfResources), so each kernel needs at least one that does. The smallest of each
    list (by shared memory, in an AOT sweep of every config for sm_80 and sm_89) compiles for
    `arch`, fits its shared memory and does not spill."""
    from ic_compile.kernels.indexer_topk import _decode_configs, _prefill_configs
    from ic_compile.kernels.sparse_attention import _block_h_candidates, _configs

    def listed(configs, kwargs, warps, stages):
        return any(all(c.kwargs.get(k) == v for k, v in kwargs.items()) and (c.num_warps, c.num_stages) == (warps, stages)
                   for c in configs)

    assert listed(_prefill_configs(32), dict(BLOCK_S=4, BLOCK_T=64, KEY_ROWS=False, HEAD_MAJOR=False), 4, 2)
    assert listed(_decode_configs(), dict(BLOCK_T=64), 4, 3)
    compiled = [_compile_indexer(4, 32, 64, 4, 2, arch=arch), _compile_indexer(1, 32, 64, 4, 3, arch=arch)]
    for heads in (64, 20):  # the MLA configs: GLM-5 and the 30B shape
        assert listed(_configs(576, _block_h_candidates(heads)), dict(BLOCK_H=32, BLOCK_K=32), 8, 2)
        compiled.append(_compile_sparse(32, 32, 8, 2, H=heads, arch=arch))
    for res in compiled:
        assert res["shared"] <= SMEM_OF_ARCH[arch], res["shared"]
        assert res["stack"] == 0, f"register spills: {res['stack']} bytes"


def test_compiles_after_interpreted_launch(tmp_path, monkeypatch):
    """Running a kernel in the interpreter (CPU) must not leave triton.language patched:
    a real compile in the same process afterwards still works (fresh cache: no cache hit)."""
    import torch

    from ic_compile.kernels.indexer_topk import indexer_topk

    q, k, w = torch.randn(1, 3, 4, 16), torch.randn(1, 20, 16), torch.rand(1, 3, 4)
    indexer_topk(q, k, w, 4, use_triton=True)  # interpreter: tl.sum/tl.cdiv run as helpers
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    _check_indexer(_compile_indexer(4, 32, 64, 4, 2), 128)


# ----------------------------------------------------------------------------- top-k selection

def _compile_topk_select(topk, warps, block, stages, resolve_warps=8, sorted_out=False, maxnreg=None):
    """-> (filter kernel, exact kernel, resolve kernel) compile results."""
    from ic_compile.kernels.topk_select import (EXACT_LAUNCH, _topk_exact_kernel, _topk_filter_kernel,
                                                _topk_resolve_kernel, launch_meta)

    meta = dict(launch_meta(topk, block, stages), ONE_REDUCE=True)
    ints = dict(width=16384, diag_base=12288, row_period=4096, topk=topk, s_row=16384, s_out=topk, s_cand=meta["CAND"])
    ptrs = dict(scores_ptr="fp32", out_ptr="i32", cand_val_ptr="fp32", cand_idx_ptr="i32", path_ptr="i32",
                n_cand_ptr="i32")
    ints_filter = {k: v for k, v in ints.items() if k != "s_out"}
    ptrs_filter = {k: v for k, v in ptrs.items() if k != "out_ptr"}
    ptrs_resolve = {k: v for k, v in ptrs.items() if k != "path_ptr"}
    resolve_meta = dict(CAND=meta["CAND"], SORTED=sorted_out, FILTERED=True, ONE_REDUCE=True)
    exact_meta = dict(CAND=meta["CAND"], BLOCK=EXACT_LAUNCH["block"], STAGES=EXACT_LAUNCH["stages"], ONE_REDUCE=True)
    return (compile_sm90(_topk_filter_kernel, ptrs_filter, ints_filter, {}, meta, warps, 1, maxnreg),
            compile_sm90(_topk_exact_kernel, ptrs_filter, ints_filter, {}, exact_meta, EXACT_LAUNCH["num_warps"], 1),
            compile_sm90(_topk_resolve_kernel, ptrs_resolve, ints, {}, resolve_meta, resolve_warps, 1))


def test_topk_select_compiles_for_sm90():
    """The launch config the indexer uses (unordered rows, topk 2048): fits, the filter's
    streaming loads are pipelined (cp.async), it keeps few enough registers for >= 4 programs
    per SM (the reason it is a kernel of its own), and whatever maxnreg spills lies outside its
    streaming loops; the exact and resolve kernels do not spill."""
    from ic_compile.kernels.indexer_topk import _SELECT_TUNING as cfg

    filt, exact, resolve = _compile_topk_select(2048, cfg.num_warps, cfg.block, cfg.stages,
                                                cfg.resolve_warps, maxnreg=cfg.maxnreg)
    for res in (filt, exact, resolve):
        assert res["shared"] <= MAX_SMEM, res["shared"]
    for res in (exact, resolve):
        assert res["stack"] == 0, f"register spills: {res['stack']} bytes"
    assert filt["regs"] * 32 * cfg.num_warps * 4 <= 65536, filt["regs"]
    assert "cp.async" in filt["ptx"]
    assert _spills_in_streaming_loops(filt["cubin"]) == []


@pytest.mark.parametrize("warps", [4, 8])
def test_topk_select_segmented_compiles_for_sm90(warps):
    """The segmented filter (few wide rows: decode), at a decode shape (topk 2048, T = 128K, 64
    segments): both kernels fit and do not spill."""
    from ic_compile.kernels.topk_select import _topk_segment_compact_kernel, _topk_segment_count_kernel, segment_meta

    count_meta, compact_meta, n_segs = segment_meta(2048, 131072, 64, 1024, 3)
    ints = dict(width=131072, diag_base=131072, row_period=16, topk=2048, s_row=131072, s_cand=4096, n_segs=n_segs)
    count = compile_sm90(_topk_segment_count_kernel, dict(scores_ptr="fp32", seg_count_ptr="i32", threshold_ptr="i32"),
                         {k: v for k, v in ints.items() if k != "s_cand"}, {}, count_meta, warps, 1)
    compact = compile_sm90(_topk_segment_compact_kernel,
                           dict(scores_ptr="fp32", cand_val_ptr="fp32", cand_idx_ptr="i32", n_cand_ptr="i32",
                                path_ptr="i32", seg_count_ptr="i32", threshold_ptr="i32"), ints, {}, compact_meta, warps, 1)
    for res in (count, compact):
        assert res["shared"] <= MAX_SMEM, res["shared"]
        assert res["stack"] == 0, f"register spills: {res['stack']} bytes"


def test_topk_select_sorted_compiles_for_sm90():
    """sorted=True (bitonic tl.sort of packed int64; not used by default): compiles and fits."""
    *_, res = _compile_topk_select(2048, 8, 2048, 1, sorted_out=True)
    assert res["shared"] <= MAX_SMEM, res["shared"]
    print({k: v for k, v in res.items() if k not in ("ptx", "cubin")})


# ----------------------------------------------------------------------------- routed MoE experts

GLM_MOE = dict(E=64, H=2048, I=1536, k=4)  # GLM-4.7-Flash's routed experts


def _compile_moe(which: str, tile, arch=90, clamp=False, shared=False, pdl=False, route=False):
    """Kernel `which` ("gate_up" / "down") of kernels/moe_experts.py at the GLM shape, bf16, int64
    indices, fp32 router weights, contiguous tensors (clamp: gate_up with DeepSeek-V4's swiglu_limit;
    shared: with GLM-4.7-Flash's shared expert, IS = I; route: gate_up routing from fp32 logits)."""
    from ic_compile.kernels.moe_experts import _down_kernel, _gate_up_kernel

    E, H, I, k = GLM_MOE["E"], GLM_MOE["H"], GLM_MOE["I"], GLM_MOE["k"]
    IS = I if shared else 0
    consts = dict(BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, STAGES=tile.num_stages, SHARED=shared, PDL=pdl,
                  PREFETCH=pdl, LINE_ELEMS=64)
    if which == "gate_up":
        ptrs = dict(x_ptr="bf16", idx_ptr="i64", gu_ptr="bf16", inter_ptr="bf16", sgate_ptr="bf16", sup_ptr="bf16",
                    sinter_ptr="bf16", logits_ptr="fp32", bias_ptr="fp32", w_ptr="fp32")
        ints = dict(H=H, I=I, E=E, TOPK=k, ROUTED=k, IS=IS, sx_t=H, sx_h=1, si_t=k, si_j=1, sg_e=2 * I * H, sg_n=H,
                    sg_h=1, sm_p=I, sm_i=1, ssg_n=H, ssg_h=1, ssu_n=H, ssu_h=1, ssm_t=IS, ssm_i=1, sl_t=E, sl_e=1,
                    sw_t=k, sw_j=1)
        # route: GLM-4.7-Flash's router (64 experts, one group, a bias, renormalised)
        consts.update(ROUTE=route, E_PAD=E, GROUPS=1, TOPK_GROUP=1, ROUTE_TOPK=k, K_PAD=k, HAS_BIAS=True,
                      RENORMALIZE=True)
        floats = {"LIMIT": 10.0, "ROUTE_SCALE": 2.5}
        return compile_sm90(_gate_up_kernel, ptrs, ints, floats, {**consts, "CLAMP": clamp},
                            tile.num_warps, 1, arch=arch)
    ptrs = dict(inter_ptr="bf16", idx_ptr="i64", w_ptr="fp32", down_ptr="bf16", out_ptr="bf16", sinter_ptr="bf16",
                sdown_ptr="bf16")
    ints = dict(H=H, I=I, E=E, TOPK=k, IS=IS, sm_p=I, sm_i=1, si_t=k, si_j=1, sw_t=k, sw_j=1, sd_e=H * I, sd_n=I,
                sd_i=1, so_t=H, so_h=1, ssm_t=IS, ssm_i=1, ssd_n=IS, ssd_i=1)
    return compile_sm90(_down_kernel, ptrs, ints, {}, consts, tile.num_warps, 1, arch=arch)


def _programs_per_sm(res, num_warps) -> int:
    """Resident programs per H100 SM by registers (allocated per thread in 8s) and shared memory."""
    regs = -(-res["regs"] // 8) * 8 * 32 * num_warps
    return min(65536 // regs, MAX_SMEM // max(1, res["shared"]), 32)


@pytest.mark.parametrize("route", [False, True], ids=["ids", "route_in_op"])
@pytest.mark.parametrize("shared", [False, True], ids=["routed", "with_shared"])
@pytest.mark.parametrize("T", [1, 8])
def test_moe_experts_default_tiles_compile_for_sm90(T, shared, route, monkeypatch):
    """The default tiles at GLM-4.7-Flash's shape on an H100 (132 SMs): fit, no spills, every loop
    (the shared expert's too) streams with cp.async, and at T = 1 every program of both launches is
    resident at once (what the module's tile comments claim)."""
    import torch

    from ic_compile.kernels import moe_experts as mod

    monkeypatch.setattr(mod, "num_sms", lambda device: 132)
    I, IS = GLM_MOE["I"], GLM_MOE["I"] if shared else 0
    tiles = dict(zip(("gate_up", "down"), mod.default_tiles(T, GLM_MOE["k"], GLM_MOE["H"], I, torch.device("cpu"),
                                                            IS)))
    programs = {"gate_up": T * (GLM_MOE["k"] + shared) * -(-I // tiles["gate_up"].block_n),
                "down": T * -(-GLM_MOE["H"] // tiles["down"].block_n)}
    for which, tile in tiles.items():
        res = _compile_moe(which, tile, shared=shared, pdl=T == 1, route=route)  # PDL: either T would do
        _assert_pdl(res["ptx"], T == 1, prefetch=T == 1 and shared, straight=False)
        assert res["shared"] <= MAX_SMEM, res["shared"]
        assert res["stack"] == 0, f"{which}: register spills: {res['stack']} bytes"
        loops = 2 if shared else 1  # routed (+ shared) loop, each with its own cp.async pipeline
        assert res["ptx"].count("cp.async.commit_group") >= loops, f"{which}: a loop not pipelined"
        if T == 1:
            assert programs[which] <= 132 * _programs_per_sm(res, tile.num_warps), (which, res["regs"], res["shared"])
        print(which, tile, {k: v for k, v in res.items() if k in ("regs", "shared", "stack")})


def test_moe_experts_clamped_gate_up_compiles_for_sm90():
    """With DeepSeek-V4's swiglu_limit (CLAMP) the gate/up kernel's default T = 1 tile still fits
    without spills and streams."""
    from ic_compile.kernels.moe_experts import Tile

    res = _compile_moe("gate_up", Tile(16, 256), clamp=True)
    assert res["stack"] == 0 and res["shared"] <= MAX_SMEM and "cp.async" in res["ptx"]
    assert "min.f32" in res["ptx"] or "min.NaN.f32" in res["ptx"]  # the cap is in the code


@slow[0]
@slow[1]
def test_moe_experts_sweep_tiles_compile_for_sm90():
    """Every tile bench/moe_experts.py sweeps compiles for both kernels and fits shared memory."""
    from ic_compile.kernels.moe_experts import sweep_tiles

    for tile in sweep_tiles():
        for which in ("gate_up", "down"):
            res = _compile_moe(which, tile)
            assert res["shared"] <= MAX_SMEM, (which, tile, res["shared"])
            print(which, tile, {k: v for k, v in res.items() if k in ("regs", "shared", "stack")})


# ----------------------------------------------------------------------------- multi_linear

@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("width,rows", [(2048, (768, 576, 128, 32)), (2048, (768, 576)), (768, (5120, 4096))],
                         ids=["hidden_f", "hidden_s", "q_resid"])
def test_multi_linear_default_tiles_compile_for_sm90(width, rows, T, monkeypatch):
    """GLM-4.7-Flash's sibling projections at the default tiles on an H100: no spills, shared memory
    fits, and the weight loop streams with 16-byte cp.async (the weights' unit K stride reaches the
    vectoriser through the per-weight pointer select), with and without the RMSNorm prologue (and its
    residual, and writing the normed rows and the sum for other readers)."""
    import torch

    from ic_compile.kernels import multi_linear as mod

    monkeypatch.setattr(mod, "num_sms", lambda device: 132)
    block_n, block_k = mod.default_tile(T, sum(rows), width, torch.device("cpu"))
    padded = [*rows, *[0] * (4 - len(rows))]
    ints = dict(T=T, K=width, N0=padded[0], N1=padded[1], N2=padded[2], N3=padded[3], S1=100, S2=200, S3=300,
                sw0=width, sw1=width, sw2=width, sw3=width, sx_t=width)
    ptrs = {name: "bf16" for name in ("x_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "w3_ptr", "y0_ptr", "y1_ptr", "y2_ptr",
                                      "y3_ptr", "r_ptr", "nw_ptr", "normed_ptr", "sum_ptr")}
    # with programmatic dependent launch (H100 / H200) and without; the norm prologue with the residual,
    # and with its side outputs
    for pdl, norm, sides in ((False, False, False), (True, False, False), (True, True, False), (False, True, True)):
        res = compile_sm90(mod._multi_linear_kernel, ptrs, ints, {"eps": 1e-5},
                           dict(T_PAD=T, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=mod.STAGES, NORM=norm, RESIDUAL=norm,
                                SCALE_THEN_ROUND=False, K_ONE_LOAD=mod._one_load_width(T, width) if norm else 0,
                                WRITE_NORMED=sides, WRITE_SUM=sides, PDL=pdl, PREFETCH=pdl, LINE_ELEMS=64),
                           4, 1)
        assert res["stack"] == 0 and res["shared"] <= MAX_SMEM, res
        assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", res["ptx"]), "no 16-byte cp.async"
        _assert_pdl(res["ptx"], pdl, prefetch=pdl)


def _assert_pdl(ptx: str, pdl: bool, prefetch: bool, straight: bool = True) -> None:
    """PDL: the grid-dependency wait comes before the first cp.async (the input may be the kernel
    before's output), the launch of the next kernel after the last one (after the main loop: launched
    earlier, its programs would take SM room this kernel's later programs need), and (prefetch) L2
    prefetches, before the wait where the code before it has no branch (straight; a branch's block
    may be laid out anywhere in the text); without PDL none of these."""
    wait, release = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    first_prefetch = ptx.find("prefetch.global.L2::evict_last")
    if not pdl:
        assert wait == release == first_prefetch == -1
        return
    assert -1 < wait < release, (wait, release)
    assert wait < ptx.find("cp.async") or "cp.async" not in ptx
    assert release > ptx.rfind("cp.async"), (release, ptx.rfind("cp.async"))
    assert (first_prefetch > -1) == prefetch, first_prefetch
    assert not (prefetch and straight) or first_prefetch < wait, (first_prefetch, wait)
