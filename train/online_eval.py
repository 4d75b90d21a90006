"""The in-training eval (trainer.eval_every): FD-CLIP and the CLIP score of what a task samples for
held-out captions, in the CLIP space the stack already uses, so it costs no extra model.

    ev = ClipSpaceEval(dim)
    ev.update(real_features, sampled_features, captions_features)   # unit-norm (B, D) each, per batch
    ev.compute()  # {"fd_clip": ..., "clip_score": ..., "images": n}, reduced over ranks (collective)
"""

from __future__ import annotations

import torch

from train.distributed import all_reduce_many
from unclip.frechet import GaussianStats, frechet_distance


class ClipSpaceEval:
    def __init__(self, dim: int):
        self.real, self.fake = GaussianStats(dim), GaussianStats(dim)
        self.clip = torch.zeros(2, dtype=torch.float64)  # sum of 100 x max(cos, 0), count

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor, text: torch.Tensor) -> None:
        """real / fake image features and the captions' text features, all unit-norm (B, D)."""
        self.real.update(real)
        self.fake.update(fake)
        cos = (fake.double() * text.double()).sum(-1).cpu()
        self.clip += torch.tensor([float((100 * cos.clamp(min=0)).sum()), float(len(cos))], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        all_reduce_many([*self.real.tensors, *self.fake.tensors, self.clip])
        fd = frechet_distance(self.real.mean_cov(), self.fake.mean_cov())
        return {"fd_clip": fd.value, "clip_score": float(self.clip[0] / self.clip[1]), "images": float(self.clip[1])}
