"""Small traceable DSA-like functions for the pass unit tests (fx.symbolic_trace, no model)."""
import torch


def indexer(q, k, w):  # q [B,S,H,D], k [B,T,D], w [B,S,H] -> topk over [B,S,T]
    scores = (torch.einsum("bshd,btd->bsht", q, k).relu() * w[..., None]).sum(dim=2)
    return scores.topk(2, dim=-1)


def layers(n: int):
    """A function of n indexer layers, each gathering v at its first selected key: (q, k, w, v) -> out."""
    def stack(q, k, w, v):  # v [B,T,E]
        out = v
        for i in range(n):
            idx = indexer(q * (i + 1), k, w).indices  # [B,S,2]
            out = out + torch.gather(v, 1, idx[..., :1].expand(-1, -1, v.shape[-1]))
        return out
    return stack
