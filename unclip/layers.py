"""Building blocks shared by the prior and the U-Net: timestep embeddings and attention."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# On a CPU, SDPA's flash kernel trains short sequences slower than the plain math one: forward and
# backward took 9.3 ms against 5.5 (64 queries, 92 keys, batch 32, bf16) and 5.8 against 1.6 (16
# queries, 44 keys); a demo decoder step ran 1.03-1.11x faster on math. From about 200 tokens on flash
# wins, and in the forward pass alone it wins throughout (python -m benchmarks.cpu_attention).
CPU_MATH_ATTENTION_MAX_KEYS = 128


def run_block(block: nn.Module, *args, checkpoint: bool = False):
    """block(*args); with `checkpoint` while gradients are on, its activations are recomputed in the
    backward pass instead of kept (activation checkpointing: less memory for about a third more
    compute). The RNG state is replayed, so dropout draws the same masks both times."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in DDPM / ADM (cos first, then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepMLP(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear: the timestep embedding of ADM and the prior."""

    def __init__(self, dim: int, hidden: int | None = None, features: int | None = None):
        super().__init__()
        self.features = features or dim
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(self.features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype
        return self.net(timestep_embedding(t, self.features).to(dtype))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention (flash / memory-efficient kernels on a GPU), except while
    training on a CPU with at most CPU_MATH_ATTENTION_MAX_KEYS keys, where the math kernel is faster."""
    cpu_training = q.device.type == "cpu" and torch.is_grad_enabled()
    use_math = cpu_training and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS
    with sdpa_kernel(SDPBackend.MATH) if use_math else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Multi-head self-attention through torch's SDPA (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x (B, L, D); mask (B, 1, L, L) bool, True where a query may attend to a key."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, mask, causal and mask is None, self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))
