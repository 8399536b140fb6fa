"""Configuration of the reference DSA model (ic_compile/dsa_model.py): ModelArgs and the named sizes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_dense_layers: int  # the first n_dense_layers use a dense MLP of inter_dim
    inter_dim: int
    n_shared_experts: int = 1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 256
    index_topk_pattern: str | None = None  # e.g. "FSSF"; None means every layer is F

    def __post_init__(self):
        p = self.index_topk_pattern
        if p is not None:
            bad = sorted(set(p) - {"F", "S"})
            if bad:
                raise ValueError(f"index_topk_pattern may only contain 'F' (full) and 'S' "
                                 f"(shared), got {bad} in {p!r}")
            if len(p) != self.n_layers:
                raise ValueError(f"index_topk_pattern {p!r} has length {len(p)} "
                                 f"but n_layers is {self.n_layers}")
            if p[0] != "F":
                raise ValueError(f"index_topk_pattern {p!r} must start with 'F': the first "
                                 f"layer has no earlier indexer to share top-k from")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError("qk_rope_head_dim must be even and <= index_head_dim")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError("n_activated_experts must be <= n_routed_experts")

    @property
    def pattern(self) -> str:
        """One 'F' or 'S' per layer."""
        return self.index_topk_pattern or "F" * self.n_layers

    @classmethod
    def tiny(cls, **overrides) -> ModelArgs:
        return cls.from_name("tiny", **overrides)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelArgs:
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})


CONFIGS = {
    # CPU-fast, for unit tests.  8 indexer heads, not 4: with 4 heads ~1/16 of the index
    # scores are exactly 0 (all heads ReLU'd away) and topk breaks those ties differently
    # for different key lengths (no-cache T=S vs cache T=max_seq_length).
    "tiny": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                 index_n_heads=8, index_head_dim=16, index_topk=8, n_routed_experts=4,
                 n_activated_experts=2, moe_inter_dim=32, n_dense_layers=1, inter_dim=128,
                 max_seq_len=256),
    # A few M parameters, byte-level, for CPU training.
    "small": dict(vocab_size=256, dim=256, n_layers=6, n_heads=4, q_lora_rank=128,
                  kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  index_n_heads=8, index_head_dim=32, index_topk=64, n_routed_experts=8,
                  n_activated_experts=2, moe_inter_dim=128, n_dense_layers=1, inter_dim=512,
                  max_seq_len=1024),
    # The paper's 30B GLM-4.7-Flash shape with DSA (build on GPU only).
    "glm4.7-flash-dsa": dict(vocab_size=154880, dim=2048, n_layers=47, n_heads=20,
                             q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192,
                             qk_rope_head_dim=64, v_head_dim=256, index_n_heads=32,
                             index_head_dim=128, index_topk=2048, n_routed_experts=64,
                             n_activated_experts=4, moe_inter_dim=1536, n_dense_layers=1,
                             inter_dim=10240, n_shared_experts=1, rope_theta=1e6,
                             norm_eps=1e-5, max_seq_len=32768),
}
