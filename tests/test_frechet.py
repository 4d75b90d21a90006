"""Frechet distance and its statistics against independent computations: scipy's sqrtm (pytorch-fid's
formula), torchmetrics' FID on the same features, closed forms, and the sum a rank reduction makes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from train.distributed import all_reduce_many
from unclip.frechet import GaussianStats, frechet_distance


def _stats(features: np.ndarray) -> GaussianStats:
    s = GaussianStats(features.shape[1])
    s.update(torch.from_numpy(features))
    return s


def _scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_matches_scipy_sqrtm_and_torchmetrics_on_the_same_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24)) @ rng.normal(size=(24, 24))
    y = rng.normal(loc=0.3, size=(500, 24)) @ rng.normal(size=(24, 24))
    ours = frechet_distance(_stats(x).mean_cov(), _stats(y).mean_cov()).value
    assert ours == pytest.approx(_scipy_fd(x, y), rel=1e-3)
    from torchmetrics.image.fid import _compute_fid

    tm = _compute_fid(
        torch.from_numpy(x.mean(0)),
        torch.from_numpy(np.cov(x, rowvar=False)),
        torch.from_numpy(y.mean(0)),
        torch.from_numpy(np.cov(y, rowvar=False)),
    )
    assert ours == pytest.approx(float(tm), rel=1e-3)


def test_identical_sets_score_zero_and_a_shift_scores_its_square():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 8))
    same = frechet_distance(_stats(x).mean_cov(), _stats(x).mean_cov())
    assert abs(same.value) < 1e-8 and same.sqrtm_error < 1e-6
    shift = np.full(8, 0.5)  # a translation leaves the covariance: FD = |shift|^2 exactly
    assert frechet_distance(_stats(x).mean_cov(), _stats(x + shift).mean_cov()).value == pytest.approx(8 * 0.25)
    # isotropic Gaussians: FD = |mu|^2 + d (s1 + s2 - 2 sqrt(s1 s2)), in closed form
    a, b = (np.zeros(8), np.eye(8) * 1.0), (np.ones(8), np.eye(8) * 4.0)
    assert frechet_distance(a, b).value == pytest.approx(8 + 8 * (1 + 4 - 2 * 2))


def test_statistics_summed_over_ranks_equal_one_pass_over_everything():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6)) * 3 + 10  # feature-like values: float64 sums keep every digit that matters
    whole = _stats(x)
    rank0, rank1 = _stats(x[:137]), _stats(x[137:])
    for mine, theirs in zip(rank0.tensors, rank1.tensors):  # what all_reduce_many(sum) does to the sums
        mine += theirs
    for a, b in zip(whole.mean_cov(), rank0.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-9)
    np.testing.assert_allclose(whole.mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-6)
    all_reduce_many(whole.tensors)
    assert whole.count == 300  # one process: the identity


def test_cached_statistics_round_trip(tmp_path):
    s = _stats(np.random.default_rng(3).normal(size=(50, 4)))
    s.save(tmp_path / "real.npz")
    back = GaussianStats.load(tmp_path / "real.npz")
    assert back.count == 50 and torch.equal(back.outer, s.outer)


def test_too_few_samples_and_a_broken_square_root_warn():
    rng = np.random.default_rng(4)
    with pytest.warns(RuntimeWarning, match="singular covariance"):
        _stats(rng.normal(size=(10, 40))).mean_cov()
    not_psd = (np.zeros(2), np.diag([1.0, -0.5]))  # what round-off does to a badly estimated covariance
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        result = frechet_distance(not_psd, (np.zeros(2), np.eye(2)))
    assert result.sqrtm_error == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        _stats(rng.normal(size=(1, 4))).mean_cov()
