"""GLIDE's own text pathway, for a decoder that reads captions without CLIP's token outputs.

GLIDE (Nichol et al. 2022) encodes the caption with a trained transformer (width 2048, 24 layers;
1.2B of its 3.5B parameters) whose per-token outputs every attention layer of the U-Net attends to.
unCLIP's decoder is GLIDE's with CLIP conditioning added; this module is that text transformer,
trained with the decoder. It tokenizes with CLIP's BPE (open_clip's SimpleTokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unclip.layers import TransformerBlock, run_block


@dataclass
class TextTransformerConfig:
    width: int = 2048
    layers: int = 24
    heads: int = 32
    context_length: int = 256  # GLIDE's caption length (unCLIP Table 3)
    vocab_size: int = 49408  # CLIP's BPE vocabulary
    checkpointing: bool = False  # activation checkpointing per transformer block


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.final_ln = nn.LayerNorm(cfg.width)

    def tokenizer(self):
        import open_clip

        return open_clip.tokenizer.SimpleTokenizer(context_length=self.cfg.context_length)

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids -> per-token features (B, T, width) and the mask of real tokens (B, T)."""
        eot = token_ids.argmax(dim=-1)  # the end-of-text token has the largest id
        mask = torch.arange(token_ids.shape[1], device=token_ids.device)[None] <= eot[:, None]
        if token_ids.shape[1] > self.cfg.context_length:
            raise ValueError(
                f"{token_ids.shape[1]} tokens, but the text transformer reads at most {self.cfg.context_length}"
            )
        position = self.positional_embedding[: token_ids.shape[1]]
        x = self.token_embedding(token_ids) + position.to(self.token_embedding.weight.dtype)
        attn_mask = mask[:, None, None, :]  # padding keys hidden, in both directions (GLIDE)
        for block in self.blocks:
            x = run_block(block, x, attn_mask, checkpoint=self.cfg.checkpointing)
        return self.final_ln(x), mask
