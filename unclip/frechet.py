"""Gaussian feature statistics and the Frechet distance between two of them (FID, FD-CLIP).

Statistics accumulate as float64 sums (count, sum, sum of outer products), which add across batches
and across ranks exactly; mean and covariance are formed once, after the reduction, so a distance
over 8 ranks is the distance over all the images, never an average of per-rank distances. This is
the math alone, used by training (its in-training eval) and by eval/ alike; summing `stats.tensors`
over ranks is the caller's (train.distributed.all_reduce_many).

    stats = GaussianStats(2048); stats.update(features); all_reduce_many(stats.tensors)
    fd = frechet_distance(real.mean_cov(), stats.mean_cov())

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) (Heusel et al. 2017). The trace of the
matrix square root is the sum of the square roots of the eigenvalues of S1 S2, which are real and
non-negative in exact arithmetic; imaginary parts or negative values beyond round-off mean
ill-conditioned covariances (too few samples for the feature width) and are reported as a warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

SQRTM_TOLERANCE = 1e-3  # relative size of imaginary / negative eigenvalue parts that is only round-off


class GaussianStats:
    """Running first and second moments of (N, D) features, in float64."""

    def __init__(self, dim: int):
        self.dim = dim
        self.n = torch.zeros(1, dtype=torch.float64)  # a tensor, so it sums over ranks with the rest
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    @property
    def count(self) -> int:
        return int(self.n.item())

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running sums, which add exactly across batches and ranks (reduce them in place)."""
        return self.n, self.sum, self.outer

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(len(features), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"features of width {f.shape[1]} for statistics of width {self.dim}")
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        if self.count <= self.dim:
            warnings.warn(
                f"{self.count} samples of {self.dim}-d features give a singular covariance: a Frechet distance "
                f"needs well over {self.dim} samples to mean anything",
                RuntimeWarning,
                stacklevel=2,
            )
        mu = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), cov.numpy()

    # --- caching (real-image statistics are computed once) -----------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, count=self.count, sum=self.sum.numpy(), outer=self.outer.numpy())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        with np.load(path) as data:
            stats = cls(int(data["sum"].shape[0]))
            stats.n = torch.tensor([float(data["count"])], dtype=torch.float64)
            stats.sum = torch.from_numpy(data["sum"])
            stats.outer = torch.from_numpy(data["outer"])
        return stats


@dataclass
class FrechetResult:
    value: float
    sqrtm_error: float  # largest imaginary or negative part of the eigenvalues, relative to the largest


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> FrechetResult:
    """FD between Gaussians a = (mu1, S1) and b = (mu2, S2), in float64."""
    (mu1, s1), (mu2, s2) = a, b
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different widths: {mu1.shape} and {mu2.shape}")
    eig = np.linalg.eigvals(s1 @ s2)
    scale = max(float(np.abs(eig).max()), 1e-300)
    error = max(float(np.abs(eig.imag).max()), float(max(0.0, -eig.real.min()))) / scale
    if error > SQRTM_TOLERANCE:
        warnings.warn(
            f"the covariance product has eigenvalues {error:.1e} (relative) off the non-negative reals: the "
            "statistics are ill-conditioned, usually too few samples for the feature width; the distance "
            "is not reliable",
            RuntimeWarning,
            stacklevel=2,
        )
    trace_sqrt = float(np.sqrt(np.clip(eig.real, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    return FrechetResult(value, error)
