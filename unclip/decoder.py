"""unCLIP's decoder: CLIP image embedding (+ optional caption) -> 64px image (Ramesh et al. 2022, sec. 2.1).

A GLIDE U-Net (unclip/unet.py) trained as a diffusion model with a cosine schedule, eps target and
learned sigma (Improved DDPM's hybrid loss). The image embedding and the caption are dropped
independently (10% and 50% of the time) for classifier-free guidance; sampling guides with both.

    decoder = load_decoder("runs/decoder/export")
    images = decoder.sample(image_embed, generator=make_generator(0))     # (B, 3, 64, 64) in [-1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unclip.diffusion import Diffusion, DiffusionConfig, Generators
from unclip.export import CONFIG, read_export
from unclip.records import from_record
from unclip.text_transformer import TextTransformer, TextTransformerConfig
from unclip.unet import UNet, UNetConfig


def _decoder_diffusion() -> DiffusionConfig:
    # unCLIP App. C: cosine schedule, eps target, learned sigma; 250 respaced steps for sampling
    return DiffusionConfig(schedule="cosine", target="eps", learn_sigma=True, sample_steps="250", clip_x0="static")


@dataclass
class DecoderConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=_decoder_diffusion)
    text_encoder: str = "clip"  # clip (frozen CLIP token outputs) | transformer (GLIDE's, trained) | none
    text_transformer: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    image_drop_prob: float = 0.1  # unCLIP sec. 2.1 (5% in one place; Karlo uses a learned null too)
    text_drop_prob: float = 0.5  # unCLIP sec. 2.1 (Karlo: 30%)
    guidance_scale: float = 3.0  # sampling default; guidance with image and caption dropped together

    def validate(self) -> None:
        if self.text_encoder not in ("clip", "transformer", "none"):
            raise ValueError(f"decoder.text_encoder must be clip, transformer or none, got {self.text_encoder!r}")
        self.diffusion.validate()


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, clip_dim: int, clip_text_width: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.clip_dim, self.clip_text_width = clip_dim, clip_text_width
        text_width = {"clip": clip_text_width, "transformer": cfg.text_transformer.width, "none": 0}[cfg.text_encoder]
        self.unet = UNet(replace(cfg.unet, clip_dim=clip_dim, text_width=text_width), cfg.diffusion.learn_sigma)
        self.text = TextTransformer(cfg.text_transformer) if cfg.text_encoder == "transformer" else None
        self.diffusion = Diffusion(cfg.diffusion)

    @property
    def image_size(self) -> int:
        return self.cfg.unet.image_size

    @property
    def reads_captions(self) -> bool:
        return self.cfg.text_encoder != "none"

    def no_weight_decay(self) -> set[str]:
        return {f"unet.{n}" for n in self.unet.no_weight_decay()}

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        image_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, 3, H, W) noisy image; image_embed (B, clip_dim) any CLIP image embedding (normalized
        here); caption as CLIP token outputs (text_tokens, text_mask) or, with the GLIDE transformer,
        as token_ids (B, T)."""
        # unit norm, then sqrt(D): features of unit variance whatever the CLIP's width
        image_embed = F.normalize(image_embed.float(), dim=-1) * math.sqrt(self.clip_dim)
        if self.text is not None:
            if token_ids is None:
                raise ValueError("this decoder encodes captions itself: pass token_ids (see caption_inputs)")
            text_tokens, text_mask = self.text(token_ids)
        if not self.reads_captions:
            text_tokens = text_mask = None
        return self.unet(
            x,
            t,
            image_embed=image_embed,
            text_tokens=text_tokens,
            text_mask=text_mask,
            drop_image=drop_image,
            drop_text=drop_text,
            inpaint_image=inpaint_image,
            inpaint_mask=inpaint_mask,
        )

    @torch.no_grad()
    def caption_inputs(self, captions: list[str], clip=None) -> dict[str, torch.Tensor]:
        """The captions as this decoder reads them: the frozen CLIP's token outputs (text_tokens,
        text_mask), token ids for its own GLIDE transformer (token_ids), or nothing."""
        if self.cfg.text_encoder == "clip":
            if clip is None:
                raise ValueError("this decoder reads the CLIP's token outputs: pass the CLIP it was trained with")
            enc = clip.encode_captions(list(captions))
            return {"text_tokens": enc.tokens, "text_mask": enc.mask}
        if self.cfg.text_encoder == "transformer":
            if getattr(self, "_tokenizer", None) is None:
                self._tokenizer = self.text.tokenizer()
            return {"token_ids": self._tokenizer(list(captions)).to(next(self.parameters()).device)}
        return {}

    def guided_fn(
        self,
        image_embed: torch.Tensor,
        caption: dict[str, torch.Tensor],
        scale: float,
        drop_caption=False,
        negative: dict[str, torch.Tensor] | None = None,
    ):
        """The model function the samplers call: classifier-free guidance runs the conditional and the
        unconditional (image embedding and caption both dropped) passes in one doubled batch.
        `caption` holds caption_inputs() and optionally inpaint_image / inpaint_mask; with drop_caption
        the conditional pass sees no caption either (variations: the image embedding alone).
        `negative`: caption_inputs() of captions to steer away from, which the unconditional pass then
        reads instead of the empty caption (a decoder that reads no captions ignores them)."""
        b = image_embed.shape[0]
        no = torch.zeros(b, dtype=torch.bool, device=image_embed.device)
        cond_text = no | drop_caption
        negative = negative or {}
        uncond_text = ~no if not negative else no

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if scale == 1.0:
                return self(x, t, image_embed, drop_text=cond_text, **caption).float()
            two = {k: torch.cat([v, negative.get(k, v)]) for k, v in caption.items() if v is not None}
            out = self(
                torch.cat([x, x]),
                torch.cat([t, t]),
                torch.cat([image_embed, image_embed]),
                drop_image=torch.cat([no, ~no]),
                drop_text=torch.cat([cond_text, uncond_text]),
                **two,
            ).float()
            return self.diffusion.guide(out[:b], out[b:], scale)

        return model_fn

    @torch.no_grad()
    def sample(
        self,
        image_embed: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        *,
        drop_caption: bool = False,
        negative: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        steps: str | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: Generators = None,
        inpaint_image: torch.Tensor | None = None,
        inpaint_mask: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        jump_length: int = 10,
        jump_n_sample: int = 1,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1].

        generator: one, or one per image (then an image depends on its own seed only).
        inpaint_image / inpaint_mask: the inputs of a decoder trained for inpainting (unet.inpaint).
        known / known_mask (1 = known): RePaint-style inpainting with any decoder; the known region is
        pasted back after every step, with `jump_n_sample` resampling jumps of `jump_length` steps.
        negative: caption_inputs() of captions to steer away from (see guided_fn).
        on_step(i, x) runs after each reverse step (a progress bar, or a hook that edits x).
        noise: the starting latent x_T (an inverted image's, see invert) instead of fresh noise."""
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        caption = {"text_tokens": text_tokens, "text_mask": text_mask, "token_ids": token_ids}
        caption |= {"inpaint_image": inpaint_image, "inpaint_mask": inpaint_mask}
        model_fn = self.guided_fn(
            image_embed, {k: v for k, v in caption.items() if v is not None}, scale, drop_caption, negative
        )
        diffusion = self.diffusion.respaced(steps)
        shape = (image_embed.shape[0], 3, self.image_size, self.image_size)
        x = diffusion.sample(
            model_fn,
            shape,
            generator=generator,
            device=image_embed.device,
            sampler=sampler,
            eta=eta,
            known=known,
            known_mask=known_mask,
            jump_length=jump_length,
            jump_n_sample=jump_n_sample,
            on_step=on_step,
            noise=noise,
        )
        return x.clamp(-1, 1)

    @torch.no_grad()
    def invert(
        self,
        images: torch.Tensor,
        image_embed: torch.Tensor,
        caption: dict[str, torch.Tensor] | None = None,
        *,
        drop_caption: bool = True,
        negative: dict[str, torch.Tensor] | None = None,
        guidance_scale: float | None = None,
        steps: str | None = None,
        on_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """DDIM inversion (unCLIP sec. 3.1): the latents x_T from which `sample` with DDIM at eta 0, on
        the same `steps` and the same conditioning, decodes `images` (B, 3, H, W) in [-1, 1] at this
        decoder's size back: their CLIP image embeddings, caption_inputs() (with drop_caption, the
        default: the embedding alone, as variations decode), the negative captions and the guidance
        scale (default: the decoder's, as sample's). Inverting under one guidance and decoding under
        another moves the picture: on the moved demo's decoder, inverted at 1 and decoded at 2, shapes
        came back up to 0.10 of the side away (docs/GENERATION.md, "Inversion")."""
        scale = self.cfg.guidance_scale if guidance_scale is None else guidance_scale
        caption = {k: v for k, v in (caption or {}).items() if v is not None}
        model_fn = self.guided_fn(image_embed, caption, scale, drop_caption, negative)
        return self.diffusion.respaced(steps).invert(model_fn, images.float(), on_step)

    def export_config(self) -> dict[str, Any]:
        return {
            "kind": "decoder",
            "decoder": asdict(self.cfg),
            "clip_dim": self.clip_dim,
            "clip_text_width": self.clip_text_width,
        }


def decoder_config_from_record(raw: Any, where: str = "config") -> DecoderConfig:
    """An export's decoder record as a DecoderConfig, every key and type checked (unclip.records)."""
    if isinstance(raw, dict) and isinstance(raw.get("unet"), dict):
        # exports written before the pooled-text pathway existed were trained without it
        raw = raw | {"unet": {"pooled_text": False} | raw["unet"]}
    return from_record(DecoderConfig, raw, f"{where}: decoder")


def decoder_from_config(config: dict[str, Any], where: str = "config") -> Decoder:
    """A decoder built from an export config (`where` names it in errors)."""
    return Decoder(decoder_config_from_record(config["decoder"], where), config["clip_dim"], config["clip_text_width"])


def load_decoder(folder: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """A decoder from a training export (runs/<name>/export), in eval mode."""
    weights, config = read_export(folder, kind="decoder")
    decoder = decoder_from_config(config, str(Path(folder) / CONFIG))
    try:
        decoder.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{folder}: the weights do not fit the exported decoder config: {e}") from e
    return decoder.to(device).eval()
