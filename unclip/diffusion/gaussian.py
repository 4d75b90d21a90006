"""Gaussian diffusion: forward process, targets, losses and samplers, once for every model.

The prior (x: CLIP image embeddings, (B, D)), the decoder and the upsamplers (x: images, (B, C, H, W))
all train and sample through this class. Notation follows DDPM / Improved DDPM: alpha_bar_t is the
product of (1 - beta_s) for s <= t; a model sees the *original* timestep t in [0, T) even when
sampling on a respaced subset.

    diffusion = Diffusion(DiffusionConfig(schedule="cosine", target="eps", learn_sigma=True))
    x_t = diffusion.q_sample(x0, t, noise)
    loss, terms = diffusion.training_loss(model(x_t, t), x0, x_t, noise, t)
    sampler = diffusion.respaced("250")
    x0 = sampler.sample(model_fn, shape, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unclip.diffusion.schedule import jump_schedule, make_betas, space_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, original timesteps) -> output
# One generator for the whole batch, or one per sample (diffusers' convention): with one per sample, a
# sample's noise depends on its own seed only, whatever batch or rank it is drawn in.
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # cosine | linear
    num_timesteps: int = 1000  # T of the training process
    target: str = "eps"  # what the model predicts: eps | x0 | v
    learn_sigma: bool = False  # the model also outputs the variance interpolation (2x channels)
    vb_weight: float = 0.001  # Improved DDPM's lambda for the variational term (learned sigma only)
    # without learned sigma: fixed_small (posterior) | fixed_large (beta) | analytic (Analytic-DPM's
    # optimal variance, from the model's x0 error measured on data; fixed_small until one is given)
    variance: str = "fixed_small"
    sampler: str = "ddpm"  # ddpm (ancestral) | ddim
    sample_steps: str = "250"  # respacing for sampling: "250", "64", "ddim27", "10,20,30"
    eta: float = 0.0  # DDIM noise scale (0: deterministic)
    clip_x0: str = "none"  # none | static (clamp to [-1, 1]) | dynamic (Imagen's thresholding)
    dynamic_percentile: float = 0.995  # dynamic thresholding: the quantile of |x0| per sample
    timestep_sampling: str = "uniform"  # training t: uniform | logit_normal (SD3: t/T = sigmoid(N(mean, std)))
    logit_mean: float = 0.0  # logit_normal: > 0 trains more at high noise, where layout and shape are decided
    logit_std: float = 1.0
    # the MSE term's weight per noise level: none | min_snr (Hang et al. 2023: the target's loss scaled to
    # min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, min(SNR, gamma) for x0; gamma 5 as theirs and
    # diffusers' --snr_gamma). Against a plain eps loss it weighs the low-noise steps less; against a
    # plain x0 loss it weighs the noisiest steps less (the demo decoder's shapes fell: docs/GENERATION.md)
    loss_weighting: str = "none"
    min_snr_gamma: float = 5.0

    def validate(self) -> None:
        checks = {
            "target": ("eps", "x0", "v"),
            "variance": ("fixed_small", "fixed_large", "analytic"),
            "sampler": ("ddpm", "ddim"),
            "clip_x0": ("none", "static", "dynamic"),
            "timestep_sampling": ("uniform", "logit_normal"),
            "loss_weighting": ("none", "min_snr"),
        }
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"diffusion.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.loss_weighting == "min_snr" and not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (or fp64 in tests), whatever precision the model ran in."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn on each generator's own device (so a CPU
    generator gives the same noise whether the model runs on a CPU or a GPU). With a list of k
    generators, generator j draws rows [j * n / k, (j + 1) * n / k) of the batch of n."""
    if isinstance(generator, Sequence):
        n, k = shape[0], len(generator)
        if k == 0 or n % k:
            raise ValueError(f"{k} generators cannot split a batch of {n}")
        return torch.cat([randn((n // k, *shape[1:]), g, device, dtype) for g in generator])
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) of 8-bit pixels x in [-1, 1] under N(means, exp(log_scales)^2), binned (DDPM sec. 3.3)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


class Diffusion:
    """The process on `timesteps` (a subset of range(T) when respaced); index i is a position in it."""

    def __init__(
        self, cfg: DiffusionConfig, timesteps: Sequence[int] | None = None, x0_error: dict[str, list] | None = None
    ):
        """`x0_error`: {"timesteps": [...], "x0_mse": [...]}, the model's E||x0 - x0_hat(x_t, t)||^2 / d
        measured on data at those original timesteps (measure_x0_error); with variance=analytic the
        reverse steps use the optimal variance derived from it (analytic_variance)."""
        cfg.validate()
        self.cfg = cfg
        self.x0_error = x0_error
        base = np.cumprod(1.0 - make_betas(cfg.schedule, cfg.num_timesteps))
        self.timesteps = np.arange(cfg.num_timesteps) if timesteps is None else np.asarray(sorted(timesteps))
        abar = base[self.timesteps]
        abar_prev = np.append(1.0, abar[:-1])
        betas = 1.0 - abar / abar_prev  # for the full process these are the schedule's own betas
        self.num_steps = len(betas)
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # q(x_{t-1} | x_t, x_0) has zero variance at t = 0: use the next value for the log (DDPM code)
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.log(betas)
        self._np = {
            "betas": betas,
            "log_betas": np.log(betas),
            "abar": abar,
            "abar_prev": abar_prev,
            "sqrt_abar": np.sqrt(abar),
            "sqrt_1m_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1.0),
            "post_var": post_var,
            "post_log_var": post_log_var,
            "post_coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "post_coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            "snr": abar / (1.0 - abar),
            "large_log_var": np.log(np.append(post_var[1] if len(post_var) > 1 else betas[0], betas[1:])),
        }
        if x0_error is not None:
            mse = np.interp(self.timesteps, x0_error["timesteps"], x0_error["x0_mse"])
            self._np["analytic_log_var"] = np.log(analytic_variance(post_var, self._np["post_coef_x0"], mse))
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def respaced(self, spec: str | int | None = None) -> Diffusion:
        """The same process on fewer steps, for sampling (spec defaults to cfg.sample_steps)."""
        return Diffusion(
            self.cfg, space_timesteps(self.cfg.num_timesteps, spec or self.cfg.sample_steps), self.x0_error
        )

    def _get(self, name: str, i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Coefficient `name` at step indices i (B,), shaped to broadcast against x (B, ...)."""
        key = (name, i.device)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._np[name]).to(i.device)
        return self._cache[key][i].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, i: torch.Tensor) -> torch.Tensor:
        """Original timesteps (float) for step indices i: what models are conditioned on."""
        return torch.from_numpy(self.timesteps).to(i.device)[i].float()

    def training_timesteps(self, n: int, device: torch.device | str, generator: torch.Generator | None = None):
        """(n,) step indices to train on: uniform, or logit-normal (Esser et al. 2024, SD3 sec. 3.1),
        which spends more of the training on the noise levels the logit mean points at."""
        if self.cfg.timestep_sampling == "uniform":
            return torch.randint(0, self.num_steps, (n,), generator=generator, device=device)
        z = torch.randn(n, generator=generator, device=device) * self.cfg.logit_std + self.cfg.logit_mean
        return (torch.sigmoid(z) * self.num_steps).long().clamp(0, self.num_steps - 1)

    # --- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, i: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        return self._get("sqrt_abar", i, x0) * x0 + self._get("sqrt_1m_abar", i, x0) * noise

    def q_posterior(self, x0, x_t, i) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = self._get("post_coef_x0", i, x_t) * x0 + self._get("post_coef_xt", i, x_t) * x_t
        return mean, self._get("post_var", i, x_t), self._get("post_log_var", i, x_t)

    def training_target(self, x0, noise, i) -> torch.Tensor:
        if self.cfg.target == "eps":
            return noise
        if self.cfg.target == "x0":
            return x0
        return self._get("sqrt_abar", i, x0) * noise - self._get("sqrt_1m_abar", i, x0) * x0  # v

    # --- from a model output to x0, eps, and p(x_{t-1} | x_t) ---------------------------------------
    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance values in [-1, 1] or None): learned sigma doubles the channels (dim 1)."""
        if not self.cfg.learn_sigma:
            return out, None
        pred, var_values = out.chunk(2, dim=1)
        return pred, var_values

    def x0_from(self, pred, x_t, i) -> torch.Tensor:
        if self.cfg.target == "x0":
            return pred
        if self.cfg.target == "eps":
            return self._get("sqrt_recip_abar", i, x_t) * x_t - self._get("sqrt_recipm1_abar", i, x_t) * pred
        return self._get("sqrt_abar", i, x_t) * x_t - self._get("sqrt_1m_abar", i, x_t) * pred  # v

    def eps_from(self, x0, x_t, i) -> torch.Tensor:
        return (self._get("sqrt_recip_abar", i, x_t) * x_t - x0) / self._get("sqrt_recipm1_abar", i, x_t)

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.cfg.clip_x0 == "static":
            return x0.clamp(-1, 1)
        if self.cfg.clip_x0 == "dynamic":  # Imagen: per-sample percentile of |x0|, never below 1
            s = torch.quantile(x0.reshape(len(x0), -1).abs().float(), self.cfg.dynamic_percentile, dim=1)
            s = s.clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
            return x0.clamp(-s, s) / s
        return x0

    def p_mean_variance(self, out, x_t, i, clip: bool = True) -> dict[str, torch.Tensor]:
        pred, var_values = self.split(out)
        if var_values is not None:  # Improved DDPM eq. 15: interpolate log variances
            frac = (var_values + 1) / 2
            log_var = frac * self._get("log_betas", i, x_t) + (1 - frac) * self._get("post_log_var", i, x_t)
        elif self.cfg.variance == "analytic" and "analytic_log_var" in self._np:
            log_var = self._get("analytic_log_var", i, x_t).expand_as(x_t)
        elif self.cfg.variance == "fixed_large":
            log_var = self._get("large_log_var", i, x_t).expand_as(x_t)
        else:
            log_var = self._get("post_log_var", i, x_t).expand_as(x_t)
        x0 = self.x0_from(pred, x_t, i)
        if clip:
            x0 = self.clip(x0)
        mean, _, _ = self.q_posterior(x0, x_t, i)
        return {"mean": mean, "log_var": log_var, "x0": x0, "eps": self.eps_from(x0, x_t, i)}

    # --- training ----------------------------------------------------------------------------------
    def training_loss(self, out, x0, x_t, noise, i) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss (B,): MSE on the target (weighted per noise level with loss_weighting), plus
        with learned sigma the variational bound with a stop-gradient on the mean, weighted by lambda * T
        (Improved DDPM's hybrid loss). terms["mse"] is the unweighted MSE, comparable across weightings."""
        pred, var_values = self.split(out)
        mse = mean_flat((self.training_target(x0, noise, i) - _at_least_fp32(pred)) ** 2)
        terms = {"mse": mse}
        loss = mse * self.loss_weights(i).to(mse.dtype)
        if var_values is None:
            return loss, terms
        frozen = _at_least_fp32(torch.cat([pred.detach(), var_values], dim=1))
        vb = self.vb_bits(frozen, x0, x_t, i) * (self.cfg.vb_weight * self.cfg.num_timesteps)
        terms["vb"] = vb
        return loss + vb, terms

    def loss_weights(self, i: torch.Tensor) -> torch.Tensor:
        """(B,) the MSE term's weight at step indices i: 1, or Min-SNR-gamma's for the target."""
        if self.cfg.loss_weighting == "none":
            return torch.ones(i.shape, dtype=torch.float64, device=i.device)
        snr, gamma = self._get("snr", i, i.double()), self.cfg.min_snr_gamma
        if self.cfg.target == "eps":
            return (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, and 1 where SNR is 0
        return snr.clamp(max=gamma) / (snr + 1.0) if self.cfg.target == "v" else snr.clamp(max=gamma)

    def vb_bits(self, out, x0, x_t, i) -> torch.Tensor:
        """L_t of the variational bound in bits per dimension: KL for t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, i)
        p = self.p_mean_variance(out, x_t, i, clip=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_var"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_var"])) / math.log(2.0)
        return torch.where(i == 0, nll, kl)

    @torch.no_grad()
    def measure_x0_error(self, model_fn: ModelFn, x0: torch.Tensor, generator: Generators = None) -> np.ndarray:
        """(num_steps,) the model's mean squared x0 error ||x0 - x0_hat(x_t, t)||^2 / d over x0's rows,
        x_t drawn from q(x_t | x0) at each step of this process (unclipped predictions)."""
        out = np.zeros(self.num_steps)
        for step in range(self.num_steps):
            i = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, i, randn(x0.shape, generator, x0.device, x0.dtype))
            pred, _ = self.split(_at_least_fp32(model_fn(x_t, self.model_timesteps(i))))
            out[step] = (x0 - self.x0_from(pred, x_t, i)).double().pow(2).mean().item()
        return out

    # --- sampling ----------------------------------------------------------------------------------
    def guide(self, out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance on the prediction (eps, x0 or v alike, all linear in it); a
        learned variance is taken from the conditional output."""
        pred_c, var_c = self.split(out_cond)
        pred_u, _ = self.split(out_uncond)
        guided = pred_u + scale * (pred_c - pred_u)
        return guided if var_c is None else torch.cat([guided, var_c], dim=1)

    def ddpm_step(self, out, x_t, i, generator: Generators) -> torch.Tensor:
        """x_{t-1} = mean + sigma z (no noise at the last step)."""
        p = self.p_mean_variance(out, x_t, i)
        noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
        nonzero = (i != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_var"]) * noise

    def ddim_step(self, out, x_t, i, generator: Generators, eta: float) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12), sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')."""
        p = self.p_mean_variance(out, x_t, i)
        abar, abar_prev = self._get("abar", i, x_t), self._get("abar_prev", i, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = p["x0"] * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * p["eps"]
        if eta > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            nonzero = (i != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
            x = x + nonzero * sigma * noise
        return x

    def step(
        self, model_fn: ModelFn, x: torch.Tensor, step: int, *, generator: Generators, sampler: str, eta: float
    ) -> torch.Tensor:
        """One reverse step: x at position `step` of this (respaced) schedule -> x at `step - 1` (x_0 after 0)."""
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        out = model_fn(x, self.model_timesteps(i))
        return self.ddim_step(out, x, i, generator, eta) if sampler == "ddim" else self.ddpm_step(out, x, i, generator)

    def renoise(self, x: torch.Tensor, step: int, generator: Generators) -> torch.Tensor:
        """One forward step: x at position `step - 1` -> a draw of x at `step`, q(x_i | x_{i-1}) =
        N(sqrt(1 - beta_i) x_{i-1}, beta_i I) with this schedule's beta (RePaint's resampling jump)."""
        beta = float(self._np["betas"][step])
        return math.sqrt(1.0 - beta) * x + math.sqrt(beta) * randn(x.shape, generator, x.device, x.dtype)

    def noised(self, x0: torch.Tensor, step: int, generator: Generators) -> torch.Tensor:
        """A draw of x at position `step` given x_0 (x_0 itself for step -1): what inpainting pastes back."""
        if step < 0:
            return x0
        i = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
        return self.q_sample(x0, i, randn(x0.shape, generator, x0.device, x0.dtype))

    @torch.no_grad()
    def invert(
        self, model_fn: ModelFn, x0: torch.Tensor, on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """DDIM inversion (Song et al. 2021, sec. 4.3; unCLIP sec. 3.1): the latent x_T from which the
        deterministic DDIM sampler (eta 0) on this schedule returns to x0, up to the inversion's own
        error. DDIM's update run forward: with eps the model's noise estimate for x (at position i - 1,
        x0 itself before position 0) read at position i, x at position i is sqrt(abar_i) x0_hat +
        sqrt(1 - abar_i) eps, where x0_hat = (x - sqrt(1 - abar_{i-1}) eps) / sqrt(abar_{i-1})."""
        x = x0
        for step in range(self.num_steps):
            i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            pred, _ = self.split(_at_least_fp32(model_fn(x, self.model_timesteps(i))))
            # the prediction as noise, any target; x0 clipped as the sampler clips it, so the two mirror each other
            eps = self.eps_from(self.clip(self.x0_from(pred, x, i)), x, i)
            abar_prev = self._get("abar_prev", i, x)
            x0_hat = (x - torch.sqrt(1 - abar_prev) * eps) / torch.sqrt(abar_prev)
            x = self._get("sqrt_abar", i, x) * x0_hat + self._get("sqrt_1m_abar", i, x) * eps
            if on_step is not None:
                x = on_step(step, x)
        return x

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        generator: Generators = None,
        device: torch.device | str = "cpu",
        noise: torch.Tensor | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the reverse process from pure noise over this (respaced) schedule; returns x_0.

        Deterministic for given generators (one, or one per sample). `on_step(i, x)` may replace x
        after the reverse step from position i (a progress bar uses it too).
        Inpainting (RePaint): with `known` (B, C, ...) and `known_mask` (1 = known, broadcastable), the
        known region noised to the current level replaces x's after every step, so the model only
        fills the rest; `jump_n_sample` > 1 adds RePaint's resampling jumps (see jump_schedule)."""
        sampler = sampler or self.cfg.sampler
        eta = self.cfg.eta if eta is None else eta
        x = noise if noise is not None else randn(shape, generator, device)
        positions = list(range(self.num_steps - 1, -2, -1))
        if known is not None:
            if known_mask is None:
                raise ValueError("inpainting with `known` needs `known_mask` (1 where the image is known)")
            known, mask = known.to(x.dtype), known_mask.to(x.dtype)
            positions = jump_schedule(self.num_steps, jump_length, jump_n_sample)
            x = mask * self.noised(known, positions[0], generator) + (1 - mask) * x
        for here, there in zip(positions, positions[1:]):
            if there > here:  # a RePaint jump back: forward noising by one step
                x = self.renoise(x, there, generator)
                continue
            x = self.step(model_fn, x, here, generator=generator, sampler=sampler, eta=eta)
            if known is not None:
                x = mask * self.noised(known, there, generator) + (1 - mask) * x
            if on_step is not None:
                x = on_step(here, x)
        return x


def analytic_variance(post_var, coef_x0, x0_mse) -> np.ndarray:
    """Analytic-DPM's optimal reverse variance for DDPM's mean (Bao et al. 2022, eq. 7 with lambda^2 the
    posterior variance): sigma*^2 = lambda^2 + (sqrt((1 - abar) / alpha) - sqrt(1 - abar' - lambda^2))^2
    (1 - E||eps_hat||^2 / d). For the optimal predictor that second term equals coef_x0^2 E Var(x0 | x_t)
    = coef_x0^2 E||x0 - x0_hat||^2 / d (coef_x0 the posterior mean's weight on x0), which is the form
    computed here: estimating 1 - E||eps_hat||^2 / d directly divides sampling error by abar at high
    noise (a 0.1% error becomes a variance off by 100x on a 64-step cosine schedule), while the x0
    error is well conditioned, and for an imperfect model it is the better estimate (Bao et al. 2022b)."""
    var = post_var + np.asarray(coef_x0) ** 2 * np.asarray(x0_mse, dtype=np.float64)
    return np.maximum(var, 1e-20)  # the last step (abar' = 1) adds no noise anyway


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
