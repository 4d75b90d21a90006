"""The diffusion module against independent references: direct formulas, iterated processes, and
single sampler steps computed by hand in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.reference import check_hybrid_loss
from unclip.diffusion import Diffusion, DiffusionConfig, make_generator, space_timesteps
from unclip.diffusion.gaussian import discretized_gaussian_log_likelihood


def _abar_cosine(t: float, T: int, s: float = 0.008) -> float:
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


def test_cosine_schedule_is_the_improved_ddpm_formula():
    d = Diffusion(DiffusionConfig(schedule="cosine", num_timesteps=1000))
    abar = d._np["abar"]
    for t in (0, 10, 500, 900):  # before the 0.999 clip bites at the very end
        assert abar[t] == pytest.approx(_abar_cosine(t + 1, 1000), rel=1e-9)
    assert d._np["betas"].max() == pytest.approx(0.999)


def test_linear_schedule_endpoints():
    betas = Diffusion(DiffusionConfig(schedule="linear", num_timesteps=1000))._np["betas"]
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)


def test_closed_form_q_matches_the_iterated_forward_process():
    d = Diffusion(DiffusionConfig(schedule="linear", num_timesteps=200))
    betas = d._np["betas"]
    # x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps: track the mean coefficient and the variance
    m, v = 1.0, 0.0
    for t in range(200):
        m, v = math.sqrt(1 - betas[t]) * m, (1 - betas[t]) * v + betas[t]
        assert d._np["sqrt_abar"][t] == pytest.approx(m, rel=1e-9)
        assert d._np["sqrt_1m_abar"][t] ** 2 == pytest.approx(v, rel=1e-9)
    # and by simulation: many chains stepped one beta at a time against one q_sample call
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(120):
        x = math.sqrt(1 - betas[t]) * x + math.sqrt(betas[t]) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    direct = d.q_sample(x0, torch.full((20000,), 119), torch.randn(x0.shape, generator=gen, dtype=x0.dtype))
    assert x.mean().item() == pytest.approx(direct.mean().item(), abs=0.03)
    assert x.std().item() == pytest.approx(direct.std().item(), abs=0.03)


def test_posterior_is_the_product_of_the_two_gaussians():
    d = Diffusion(DiffusionConfig(schedule="cosine", num_timesteps=1000))
    rng = np.random.default_rng(0)
    for t in (1, 5, 250, 999):
        abar_prev, beta = d._np["abar"][t - 1], d._np["betas"][t]
        x0, xt = rng.normal(size=4), rng.normal(size=4)
        # p(x_{t-1} | x0) = N(sqrt(abar_prev) x0, 1 - abar_prev); p(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        var = 1 / precision
        mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(1 - beta) * xt / beta)
        i = torch.full((4,), t)
        got_mean, got_var, _ = d.q_posterior(torch.from_numpy(x0), torch.from_numpy(xt), i)
        np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(got_var.numpy().ravel(), var, rtol=1e-7)


def test_respacing_keeps_the_marginals_at_the_kept_steps():
    full = Diffusion(DiffusionConfig(num_timesteps=1000))
    for spec, count in (("250", 250), ("64", 64), ("ddim27", 27), ("10,20", 30)):
        kept = space_timesteps(1000, spec)
        assert len(kept) == count
        sub = full.respaced(spec)
        np.testing.assert_allclose(sub._np["abar"], full._np["abar"][kept], rtol=1e-12)
        np.testing.assert_allclose(np.cumprod(1 - sub._np["betas"]), sub._np["abar"], rtol=1e-9)
    assert space_timesteps(1000, "250")[-1] == 999 and space_timesteps(1000, "ddim27")[0] == 0


def test_targets_convert_back_to_x0_and_eps():
    gen = torch.Generator().manual_seed(1)
    x0, noise = (
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
    )
    i = torch.tensor([0, 1, 10, 300, 700, 999])
    for target in ("eps", "x0", "v"):
        d = Diffusion(DiffusionConfig(target=target))
        x_t = d.q_sample(x0, i, noise)
        pred = d.training_target(x0, noise, i)
        torch.testing.assert_close(d.x0_from(pred, x_t, i), x0)
        torch.testing.assert_close(d.eps_from(x0, x_t, i), noise)


def _linear_model(x, t):
    return 0.3 * x + 0.1  # a known model function, the same whatever t


def test_ddim_step_by_hand():
    T = 100
    d = Diffusion(DiffusionConfig(schedule="cosine", num_timesteps=T, target="eps")).respaced("ddim10")
    step = 6  # index in the respaced process
    t, t_prev = d.timesteps[step], d.timesteps[step - 1]
    a, a_prev = _abar_cosine(t + 1, T), _abar_cosine(t_prev + 1, T)
    x = 0.8
    eps = 0.3 * x + 0.1
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps  # eta = 0
    xt = torch.full((1, 1), x, dtype=torch.float64)
    got = d.ddim_step(_linear_model(xt, None), xt, torch.tensor([step]), None, eta=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_ddpm_step_by_hand_with_known_noise():
    T = 50
    d = Diffusion(DiffusionConfig(schedule="linear", num_timesteps=T, target="x0", variance="fixed_small"))
    t = 20
    betas = np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T)
    abar = np.cumprod(1 - betas)
    x, x0 = 0.5, 0.3 * 0.5 + 0.1  # the model predicts x0 directly
    coef_x0 = betas[t] * math.sqrt(abar[t - 1]) / (1 - abar[t])
    coef_xt = (1 - abar[t - 1]) * math.sqrt(1 - betas[t]) / (1 - abar[t])
    var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    z = torch.randn((1, 1), generator=make_generator(5), dtype=torch.float64).item()
    expected = coef_x0 * x0 + coef_xt * x + math.sqrt(var) * z
    xt = torch.full((1, 1), x, dtype=torch.float64)
    got = d.ddpm_step(_linear_model(xt, None), xt, torch.tensor([t]), make_generator(5))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_learned_variance_interpolates_in_log_space():
    d = Diffusion(DiffusionConfig(learn_sigma=True, num_timesteps=1000))
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t = 400
    for v, frac in ((-1.0, 0.0), (1.0, 1.0), (0.0, 0.5)):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        log_var = d.p_mean_variance(out, x, torch.tensor([t]))["log_var"]
        expected = frac * math.log(d._np["betas"][t]) + (1 - frac) * d._np["post_log_var"][t]
        assert log_var.flatten()[0].item() == pytest.approx(expected, rel=1e-9)


def test_guidance_is_linear_in_the_prediction_and_keeps_the_conditional_variance():
    d = Diffusion(DiffusionConfig(learn_sigma=True))
    cond = torch.cat([torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)], dim=1)
    uncond = torch.cat([torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), -0.5)], dim=1)
    out = d.guide(cond, uncond, 3.0)
    assert torch.allclose(out[:, :3], torch.full((2, 3, 4, 4), 3.0))
    assert torch.allclose(out[:, 3:], torch.full((2, 3, 4, 4), 0.5))


def test_dynamic_thresholding():
    d = Diffusion(DiffusionConfig(clip_x0="dynamic", dynamic_percentile=1.0))
    x0 = torch.tensor([[0.5, -0.2], [4.0, -2.0]])
    out = d.clip(x0)
    torch.testing.assert_close(out[0], x0[0])  # inside [-1, 1]: untouched
    torch.testing.assert_close(out[1], torch.tensor([1.0, -0.5]))  # divided by its max |x0|
    assert Diffusion(DiffusionConfig(clip_x0="static")).clip(x0).abs().max() == 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_for_a_seed(sampler):
    d = Diffusion(DiffusionConfig(sampler=sampler, eta=0.5)).respaced("20")
    a = d.sample(_linear_model, (3, 4), generator=make_generator(0))
    b = d.sample(_linear_model, (3, 4), generator=make_generator(0))
    c = d.sample(_linear_model, (3, 4), generator=make_generator(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hybrid_loss_matches_a_reference_computation():
    """MSE on eps plus lambda * T * (KL in bits, or the binned NLL at t = 0), computed independently in
    float64 with the exact normal CDF (tests/reference.py), against the module."""
    d = Diffusion(DiffusionConfig(learn_sigma=True, num_timesteps=1000, vb_weight=0.001))
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (4, 3, 4, 4), generator=gen).double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    i = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, i, noise)
    out = torch.randn(4, 6, 4, 4, generator=gen, dtype=torch.float64) * 0.5
    loss, terms = d.training_loss(out, x0, x_t, noise, i)
    check_hybrid_loss(d, out, x0, x_t, noise, i, loss, terms)


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_min_snr_weighting_is_the_papers_formula(target):
    """Min-SNR-gamma (Hang et al. 2023): the target's MSE scaled to min(SNR, gamma) / SNR (eps),
    / (SNR + 1) (v), min(SNR, gamma) (x0), with SNR from the cosine formula itself; the logged MSE stays
    unweighted, and "none" leaves the loss as it was."""
    gamma, steps = 5.0, (0, 10, 270, 500, 900)
    cfg = DiffusionConfig(target=target, loss_weighting="min_snr", min_snr_gamma=gamma)
    weighted, plain = Diffusion(cfg), Diffusion(DiffusionConfig(target=target))
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(len(steps), 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    i = torch.tensor(steps)
    x_t = weighted.q_sample(x0, i, noise)
    loss, terms = weighted.training_loss(out, x0, x_t, noise, i)
    base, base_terms = plain.training_loss(out, x0, x_t, noise, i)
    abar = torch.tensor([_abar_cosine(t + 1, 1000) for t in steps], dtype=torch.float64)
    snr = abar / (1 - abar)
    expected = {"eps": snr.clamp(max=gamma) / snr, "v": snr.clamp(max=gamma) / (snr + 1), "x0": snr.clamp(max=gamma)}
    torch.testing.assert_close(loss, base * expected[target], rtol=1e-9, atol=0)
    torch.testing.assert_close(terms["mse"], base_terms["mse"])
    torch.testing.assert_close(base, base_terms["mse"])
    if target == "eps":  # the low-noise steps weigh less, the noisy ones fully
        assert expected["eps"][0] < 1e-3 and expected["eps"][-1] == 1.0
    last = weighted.loss_weights(torch.tensor([999]))  # SNR near 0 at the end of the schedule: finite
    assert torch.isfinite(last).all()


def test_min_snr_gamma_must_be_positive():
    with pytest.raises(ValueError, match="min_snr_gamma"):
        Diffusion(DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=0.0))
    with pytest.raises(ValueError, match="loss_weighting"):
        Diffusion(DiffusionConfig(loss_weighting="p2"))


def test_the_variational_term_does_not_train_the_mean():
    d = Diffusion(DiffusionConfig(learn_sigma=True))
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    i = torch.tensor([3, 600])
    x_t = d.q_sample(x0, i, noise)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    _, terms = d.training_loss(out, x0, x_t, noise, i)
    terms["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_discretized_likelihood_is_a_distribution_over_the_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0)):
        ll = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        )
        assert ll.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


# --- per-sample generators and inpainting (RePaint) -------------------------------------------------
def test_a_list_of_generators_gives_each_sample_its_own_noise():
    from unclip.diffusion import randn

    gens = [make_generator(s) for s in (5, 6, 7)]
    batch = randn((6, 2, 3), gens, "cpu")  # two rows per generator
    for k, seed in enumerate((5, 6, 7)):
        alone = torch.randn((2, 2, 3), generator=make_generator(seed))
        assert torch.equal(batch[2 * k : 2 * k + 2], alone)
    with pytest.raises(ValueError, match="cannot split a batch"):
        randn((4, 2), gens, "cpu")


def test_sampling_with_per_sample_generators_does_not_depend_on_the_batch():
    d = Diffusion(DiffusionConfig(schedule="cosine", num_timesteps=100, sampler="ddpm")).respaced("10")
    model = lambda x, t: 0.1 * x  # noqa: E731
    both = d.sample(model, (2, 3, 4, 4), generator=[make_generator(1), make_generator(2)])
    second = d.sample(model, (1, 3, 4, 4), generator=[make_generator(2)])
    assert torch.allclose(both[1:], second, atol=1e-6)


def test_jump_schedule_walks_down_by_one_with_the_papers_jumps():
    from unclip.diffusion import jump_schedule, model_calls

    assert jump_schedule(5) == [4, 3, 2, 1, 0, -1]  # no resampling: the plain reverse walk
    positions = jump_schedule(20, jump_length=5, jump_n_sample=3)
    assert positions[0] == 19 and positions[-1] == -1
    assert all(abs(a - b) == 1 for a, b in zip(positions, positions[1:]))
    # jumps start at 0, 5, 10 (those below T - jump_length), each taken twice: 3 x 2 x 5 extra steps
    assert model_calls(20, 5, 3) == 20 + 3 * 2 * 5
    with pytest.raises(ValueError):
        jump_schedule(10, jump_length=0)


@pytest.mark.parametrize("jumps", [1, 3])
def test_inpainting_keeps_the_known_region_exactly_and_paints_the_rest(jumps):
    d = Diffusion(DiffusionConfig(schedule="cosine", num_timesteps=200, target="x0")).respaced("20")
    known = torch.full((2, 3, 8, 8), 0.5)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :, :4] = 1  # left half known
    calls = []

    def model(x, t):  # predicts x0 = -0.5 everywhere: the painted half should come out at -0.5
        calls.append(t[0].item())
        return torch.full_like(x, -0.5)

    out = d.sample(
        model,
        (2, 3, 8, 8),
        generator=make_generator(0),
        known=known,
        known_mask=mask,
        jump_n_sample=jumps,
        jump_length=5,
    )
    assert torch.equal(out[..., :4], known[..., :4])
    assert torch.allclose(out[..., 4:], torch.full_like(out[..., 4:], -0.5), atol=1e-5)
    from unclip.diffusion import model_calls

    assert len(calls) == model_calls(20, 5, jumps)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_analytic_variance_is_the_true_reverse_variance_for_gaussian_data(target):
    """For data x0 ~ N(0, s^2 I) and the exact predictor, q(x_{t-1} | x_t) is Gaussian with variance
    posterior + coef_x0^2 Var(x0 | x_t). The variance derived from the x0 error that
    measure_x0_error finds on samples must be that, on a respaced process, and equal Analytic-DPM's
    eq. 7 computed from the exact E||eps_hat||^2."""
    s2, d = 0.25, 64
    diffusion = Diffusion(DiffusionConfig(schedule="cosine", target=target, variance="analytic")).respaced("64")
    n = diffusion._np
    abar = torch.from_numpy(n["abar"])

    def exact(x_t, t):  # the Bayes-optimal prediction for Gaussian data, in the chosen target
        a = abar[[int(np.searchsorted(diffusion.timesteps, int(v))) for v in t]].to(x_t)[:, None]
        eps = (1 - a).sqrt() * x_t / (a * s2 + 1 - a)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[target]

    x0 = torch.randn(4096, d, dtype=torch.float64, generator=make_generator(0)) * math.sqrt(s2)
    measured = diffusion.measure_x0_error(exact, x0, make_generator(1))
    posterior_x0_var = s2 * (1 - n["abar"]) / (n["abar"] * s2 + 1 - n["abar"])
    np.testing.assert_allclose(measured, posterior_x0_var, rtol=0.03)
    analytic = Diffusion(diffusion.cfg, diffusion.timesteps, {"timesteps": diffusion.timesteps, "x0_mse": measured})
    true_var = n["post_var"] + n["post_coef_x0"] ** 2 * posterior_x0_var
    np.testing.assert_allclose(np.exp(analytic._np["analytic_log_var"][1:]), true_var[1:], rtol=0.03)
    # Analytic-DPM's eq. 7 with the exact E||eps_hat||^2 / d = (1 - abar) / (abar s^2 + 1 - abar)
    alpha = n["abar"] / n["abar_prev"]
    gap = np.sqrt((1 - n["abar"]) / alpha) - np.sqrt(1 - n["abar_prev"] - n["post_var"])
    eq7 = n["post_var"] + gap**2 * (1 - (1 - n["abar"]) / (n["abar"] * s2 + 1 - n["abar"]))
    np.testing.assert_allclose(eq7[1:], true_var[1:], rtol=1e-6)
    # ... and it is what a reverse step uses; without an estimate the step is DDPM's ancestral one
    x_t, i = torch.zeros(2, d, dtype=torch.float64), torch.tensor([30, 30])
    p = analytic.p_mean_variance(exact(x_t, analytic.model_timesteps(i)), x_t, i)
    assert p["log_var"][0, 0].item() == pytest.approx(analytic._np["analytic_log_var"][30])
    q = diffusion.p_mean_variance(exact(x_t, diffusion.model_timesteps(i)), x_t, i)
    assert q["log_var"][0, 0].item() == pytest.approx(diffusion._np["post_log_var"][30])
    assert analytic._np["analytic_log_var"][30] > diffusion._np["post_log_var"][30]


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_ddim_inversion_then_ddim_sampling_gives_the_data_back(target):
    """For Gaussian data and the exact predictor, DDIM's ODE is the probability flow: inverting a point
    and sampling back with eta 0 returns it, to the discretization error, which shrinks with the
    steps. Fresh noise instead reaches an unrelated point."""
    s2, d = 0.25, 16

    def round_trip(steps: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        diffusion = Diffusion(DiffusionConfig(schedule="cosine", target=target, sampler="ddim")).respaced(steps)
        abar = torch.from_numpy(diffusion._np["abar"])

        def exact(x_t, t):
            a = abar[[int(np.searchsorted(diffusion.timesteps, int(v))) for v in t]].to(x_t)[:, None]
            eps = (1 - a).sqrt() * x_t / (a * s2 + 1 - a)
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[target]

        x0 = torch.randn(8, d, dtype=torch.float64, generator=make_generator(0)) * math.sqrt(s2)
        latent = diffusion.invert(exact, x0)
        back = diffusion.sample(exact, x0.shape, noise=latent, sampler="ddim", eta=0.0)
        return x0, latent, back

    x0, latent, back = round_trip("ddim200")
    assert (back - x0).abs().max() < 0.02
    assert latent.std() == pytest.approx(1.0, abs=0.15)  # a latent of the prior's scale, not the image
    coarse = round_trip("ddim25")
    assert (coarse[2] - coarse[0]).abs().max() > (back - x0).abs().max()  # fewer steps, a larger error
