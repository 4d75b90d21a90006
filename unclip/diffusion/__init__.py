"""Diffusion math, once for the prior, the decoder and the upsamplers."""

from unclip.diffusion.gaussian import Diffusion, DiffusionConfig, make_generator, mean_flat
from unclip.diffusion.schedule import cosine_betas, linear_betas, make_betas, space_timesteps

__all__ = [
    "Diffusion",
    "DiffusionConfig",
    "make_generator",
    "mean_flat",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "space_timesteps",
]
