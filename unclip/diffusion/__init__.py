"""Diffusion math, once for the prior, the decoder and the upsamplers."""

from unclip.diffusion.gaussian import Diffusion, DiffusionConfig, Generators, make_generator, mean_flat, randn
from unclip.diffusion.schedule import (
    cosine_betas,
    jump_schedule,
    linear_betas,
    make_betas,
    model_calls,
    space_timesteps,
)

__all__ = [
    "Diffusion",
    "DiffusionConfig",
    "Generators",
    "make_generator",
    "mean_flat",
    "randn",
    "jump_schedule",
    "model_calls",
    "cosine_betas",
    "linear_betas",
    "make_betas",
    "space_timesteps",
]
