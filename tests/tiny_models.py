"""Tiny DSA model configs shared by the tests (random weights, CPU-fast)."""

import torch
from torch import nn

from ic_compile.tools.models import HF_TINY  # the `hf-tiny:` CLI model; tests monkeypatch it (restored)

PLANS = ["FFFF", "FSFS", "FSSS", "FFSF"]  # all-F, every other, one F, irregular (greedy-looking)


def glm(pattern=None, seed=0, dtype=torch.float32, attn="sdpa", built_in=False):
    """built_in: built with `dtype` as the default dtype, as a checkpoint of that dtype loads (and
    bench/prefill.build_model builds the 47-layer model): what HF creates in fp32 explicitly (GLM's
    router gate.weight, e_score_correction_bias) stays fp32. Otherwise the whole model is cast."""
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM
    extra = {} if pattern is None else {"index_topk_pattern": pattern}
    config = GlmMoeDsaConfig(**HF_TINY, **extra)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    if not built_in:
        return GlmMoeDsaForCausalLM(config).to(dtype).eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return GlmMoeDsaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def glm_with_plan(full_model, pattern):
    """The oracle: HF's own IndexCache model with the same weights (S layers have no indexer)."""
    oracle = glm(pattern, dtype=next(full_model.parameters()).dtype,
                 attn=full_model.config._attn_implementation)
    result = oracle.load_state_dict(full_model.state_dict(), strict=False)
    assert not result.missing_keys, result.missing_keys
    assert all(".indexer." in k for k in result.unexpected_keys)
    return oracle


def deepseek_v32(seed=0, dtype=torch.float32):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    torch.manual_seed(seed)
    return DeepseekV32ForCausalLM(DeepseekV32Config(**HF_TINY, n_group=1, topk_group=1)).to(dtype).eval()


def break_graph_in_moe(monkeypatch, moe_class):
    """moe_class.forward first counts host-side (as expert dispatch code does) and breaks the graph."""
    forward = moe_class.forward

    def dispatch_with_break(self, hidden_states):
        torch.bincount(hidden_states.new_zeros(3, dtype=torch.long)).tolist()
        torch._dynamo.graph_break()
        return forward(self, hidden_states)

    monkeypatch.setattr(moe_class, "forward", dispatch_with_break)


def with_random_router_bias(model):
    """e_score_correction_bias is zeros at init: random values, so that a router's bias shows."""
    generator = torch.Generator().manual_seed(3)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
    return model


def random_ids(batch=2, seq=16, seed=1, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(model, ids, steps):
    """Logits of a prefill and len(steps[0]) single-token decode steps with a DynamicCache."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(ids, cache=cache, use_cache=True).logits]
        for t in range(steps.shape[1]):
            logits.append(model(steps[:, t:t + 1], cache=cache, use_cache=True).logits)
    return logits, cache


def static_cache_steps(run, model, ids, steps, max_len, cache=None):
    """Last-token logits of a prefill and single-token steps with a StaticCache (fixed shapes).
    (transformers 5 writes each step at the cache's running length; cache_position agrees with it.)"""
    from transformers import StaticCache

    cache = cache or StaticCache(config=model.config, max_cache_len=max_len)
    n, out = ids.shape[1], []
    with torch.no_grad():
        for t, tokens in enumerate([ids] + [steps[:, i:i + 1] for i in range(steps.shape[1])]):
            position = torch.arange(n, device=ids.device) if t == 0 else torch.tensor([n + t - 1], device=ids.device)
            # a copy: under CUDA graphs the output lives in the graph's pool, rewritten by the next replay
            out.append(run(tokens, cache=cache, use_cache=True, cache_position=position).logits[:, -1].clone())
    return out


# --- a model whose indexers' top-k values are used (tests/passes/test_topk_values.py, ONNX export)

TOPK = 8  # ValuesModel's top-k, > the first rows' allowed keys (causal, 12 tokens): empty slots in those rows


class ValuesIndexer(nn.Module):
    """einsum indexer over a causal prefix; `mask_style` says how the mask is applied."""

    def __init__(self, mask_style: str, dim=16, heads=4, head_dim=8):
        super().__init__()
        self.mask_style = mask_style
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.k = nn.Linear(dim, head_dim, bias=False)
        self.w = nn.Linear(dim, heads, bias=False)
        self.heads = heads

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, -1)
        scores = torch.einsum("bshd,btd->bsht", q, self.k(x)).clamp_min(0) * 0.5
        scores = (scores * self.w(x).sigmoid()[..., None]).sum(2)  # [B, T, T]
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.mask_style == "fill":
            scores = scores.masked_fill(~allowed, float("-inf"))
        elif self.mask_style == "additive":
            scores = scores + torch.zeros(T, T).masked_fill(~allowed, torch.finfo(scores.dtype).min)
        elif self.mask_style == "shifted":  # -inf masked, then a constant added (not lowered: values lack it)
            scores = scores.masked_fill(~allowed, float("-inf")) + 1.0
        elif self.mask_style == "where":  # a scalar fill
            scores = torch.where(allowed, scores, -1e4)
        else:  # "tensor": a fill that depends on the input (not lowered: its values in empty slots are unknown)
            scores = torch.where(allowed, scores, x[..., :1] - 100)
        top = scores.topk(TOPK, dim=-1)
        return top.values, top.indices


class ValuesModel(nn.Module):
    """Two indexer layers; each weights the picked tokens by a softmax over their scores."""

    def __init__(self, mask_style):
        super().__init__()
        self.layers = nn.ModuleList(ValuesIndexer(mask_style) for _ in range(2))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            values, idx = layer(x)
            weight = values.float().softmax(-1).nan_to_num()  # -inf rows' empty slots: weight 0
            picked = torch.gather(x[:, None].expand(-1, x.shape[1], -1, -1), 2,
                                  idx[..., None].expand(-1, -1, -1, x.shape[-1]))  # [B,T,k,dim]
            x = x + (weight[..., None] * picked).sum(2)
            outs.append(values)
        return x, *outs
