"""Every sampling knob of the generation pipeline, in one dataclass shared by the Python API, the
command line (python -m unclip.sample: one flag per field) and the eval (pipeline.* in conf/eval.yaml)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from unclip.diffusion.schedule import check_steps


def _knob(default, help: str):
    """A sampling setting; its help text is the command line's (python -m unclip.sample --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class SampleSettings:
    """Every sampling knob; None takes the export's own value (the paper's, for paper presets)."""

    seed: int = _knob(0, "image j of every prompt (or input image) uses seed + j")
    batch_size: int = _knob(8, "images sampled together")
    negative_prompt: str | None = _knob(
        None, "a caption to steer away from: the guided prior and decoder read it in place of the empty caption"
    )
    prior_steps: str | None = _knob(None, 'prior respacing, e.g. "64" (unCLIP)')
    prior_guidance: float | None = _knob(None, "prior guidance scale (1 = unguided: guiding the prior hurt)")
    prior_candidates: int | None = _knob(None, "prior best-of-N by similarity to the caption (unCLIP: 2)")
    decoder_steps: str | None = _knob(None, 'decoder respacing: "250" (unCLIP), "ddim50", "10,20,30"')
    decoder_sampler: str | None = _knob(None, "decoder sampler: ddpm | ddim")
    decoder_eta: float | None = _knob(None, "decoder DDIM noise (0: deterministic)")
    decoder_guidance: float | None = _knob(None, "decoder classifier-free guidance scale")
    up256_steps: str | None = _knob(None, 'up256 respacing (unCLIP: "ddim27")')
    up256_sampler: str | None = _knob(None, "up256 sampler: ddpm | ddim")
    up256_eta: float | None = _knob(None, "up256 DDIM noise")
    up1024_steps: str | None = _knob(None, 'up1024 respacing (unCLIP: "ddim15")')
    up1024_sampler: str | None = _knob(None, "up1024 sampler: ddpm | ddim")
    up1024_eta: float | None = _knob(None, "up1024 DDIM noise")
    stop_at: int | None = _knob(None, "stop at this output size (64, 256, 1024); default: every loaded stage")
    rerank: int = _knob(0, "text: draw this many per prompt, keep the best by CLIP score (0: off)")
    jump_length: int = _knob(10, "inpainting without an inpainting decoder: RePaint jump length")
    jump_n_sample: int = _knob(1, "RePaint resamplings per jump (1: none; the RePaint paper uses 10)")
    feather: int = _knob(2, "inpainting: pixels over which the final paste blends into the painted region")
    start: str | None = _knob(
        None,
        "variations, interpolate, text-diff: inverted (the image's DDIM-inverted latent, unCLIP sec. 3.1; the "
        "default) | noise (fresh noise)",
    )
    image_fit: str = _knob("crop", "a non-square input image for CLIP: crop (its centre, as CLIP was trained) | pad")

    def validate(self, name: Callable[[str], str] = str) -> None:
        """Every knob in its range, finite; `name` turns a field into what the caller calls it (the
        command line's --decoder-guidance, the eval's pipeline.decoder_guidance)."""
        for f, low, high in _RANGES:
            value = getattr(self, f)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name(f)} must be a finite number, got {value!r}")
            if value < low or (high is not None and value > high):
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ValueError(f"{name(f)} must be {span}, got {value!r}")
        for f in ("prior_steps", "decoder_steps", "up256_steps", "up1024_steps"):
            if getattr(self, f) is not None:
                check_steps(getattr(self, f), name(f))
        if self.start not in (None, "inverted", "noise"):
            raise ValueError(f"{name('start')} must be inverted or noise, got {self.start!r}")
        if self.image_fit not in ("crop", "pad"):
            raise ValueError(f"{name('image_fit')} must be crop or pad, got {self.image_fit!r}")
        for f in ("decoder_sampler", "up256_sampler", "up1024_sampler"):
            if getattr(self, f) not in (None, "ddpm", "ddim"):
                raise ValueError(f"{name(f)} must be ddpm or ddim, got {getattr(self, f)!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"{name('negative_prompt')} must be text")


# (field, lowest, highest or None): what each numeric knob may be. Guidance 0 is the unconditional
# model, 1 the conditional one; DDIM's eta above 1 would take the square root of a negative variance.
_RANGES = (
    ("seed", 0, 2**63 - 1),
    ("batch_size", 1, None),
    ("prior_guidance", 0, None),
    ("prior_candidates", 1, None),
    ("decoder_guidance", 0, None),
    ("decoder_eta", 0, 1),
    ("up256_eta", 0, 1),
    ("up1024_eta", 0, 1),
    ("stop_at", 1, None),
    ("rerank", 0, None),
    ("jump_length", 1, None),
    ("jump_n_sample", 1, None),
    ("feather", 0, None),
)


def merge_settings(settings: SampleSettings | None, overrides: dict[str, Any]) -> SampleSettings:
    known = {f.name for f in fields(SampleSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown sampling settings {unknown}; see unclip.pipeline.SampleSettings")
    s = replace(settings or SampleSettings(), **overrides)
    s.validate()
    return s


def deterministic(s: SampleSettings) -> SampleSettings:
    """Interpolations hold the decoder's noise fixed: DDIM with eta 0 unless the caller says otherwise."""
    return replace(s, decoder_sampler=s.decoder_sampler or "ddim", decoder_eta=s.decoder_eta or 0.0)


def sampler_settings(s: SampleSettings, stage: str, diffusion) -> dict[str, Any]:
    steps, sampler, eta = (getattr(s, f"{stage}_{k}") for k in ("steps", "sampler", "eta"))
    return {
        "steps": steps or diffusion.sample_steps,
        "sampler": sampler or diffusion.sampler,
        "eta": diffusion.eta if eta is None else eta,
    }
