"""Why a decode step's RoPE kernels take 4.5-4.8 us: is it the sin / cos of a far position?

    python bench/rope_decode.py        # prints JSON rows; nothing saved

HF's rotary embedding computes cos / sin of position * inv_freq once per forward and every layer applies
them; Inductor fuses the trig into each layer's RoPE kernel, so each recomputes it (seen in the decode
graph's generated code on CPU). inv_freq[0] = 1, so at position 200000 the argument is 2e5 rad, where
CUDA's precise sinf / cosf leave their fast range reduction (|x| < 105615) for the slow one. This times
one layer's RoPE as HF writes it (q [1,20,1,64], k [1,1,1,64]), compiled by Inductor, replayed from a
CUDA graph, at positions 100 and 200000, against the same with cos / sin given as inputs (computed once).
"""
from __future__ import annotations

import json

import torch
import triton.testing

HEADS, ROPE_DIM, THETA = 20, 64, 1_000_000.0


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def cos_sin(position, inv_freq):
    freqs = position[:, None].float() * inv_freq[None, :]  # [1, dr/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().bfloat16(), emb.sin().bfloat16()


def rope_given(q, k, cos, sin):  # the trig computed once, outside
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rope_in_layer(q, k, position, inv_freq):  # the trig fused into the layer's kernel
    return rope_given(q, k, *cos_sin(position, inv_freq))


def main():
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, 1, ROPE_DIM, device="cuda").bfloat16()
    k = torch.randn(1, 1, 1, ROPE_DIM, device="cuda").bfloat16()
    inv_freq = 1.0 / THETA ** (torch.arange(0, ROPE_DIM, 2, device="cuda").float() / ROPE_DIM)
    fused, given = torch.compile(rope_in_layer), torch.compile(rope_given)
    for pos in (100, 200_000):
        position = torch.tensor([pos], device="cuda")
        cos, sin = cos_sin(position, inv_freq)
        fused(q, k, position, inv_freq), given(q, k, cos, sin)  # compile before the graph capture
        us = {"trig_in_kernel": 1e3 * triton.testing.do_bench_cudagraph(lambda: fused(q, k, position, inv_freq)),
              "trig_given": 1e3 * triton.testing.do_bench_cudagraph(lambda: given(q, k, cos, sin))}
        print(json.dumps({"position": pos, **{f"{name}_us": round(v, 2) for name, v in us.items()}}), flush=True)


if __name__ == "__main__":
    main()
