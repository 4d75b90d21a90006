"""The modes that decode CLIP image embeddings (unCLIP sec. 3): variations, interpolations, text diffs.
Mixed into unclip.pipeline.Pipeline (one pipeline; this file keeps it readable).

Each starts, as the paper does, from the image's own latent: the decoder's DDIM inversion of the image
given its CLIP embedding (sec. 3.1), under what the decode will read (its guidance, prompt and negative
prompt: inverted under one model and decoded under another, the picture moves). Decoded with DDIM at
eta 0 that latent gives the image back;
variations decode it at eta > 0 (VARIATION_ETA unless decoder_eta says otherwise), so they keep the
image's layout and vary its details; an interpolation slerps between the two images' latents as between
their embeddings, so its first and last frames are the images; a text diff keeps the image's latent, so
its first frame is the image. `start="noise"` decodes from fresh noise instead (the old behaviour).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from unclip.editing import slerp
from unclip.images import ImageLike, load_image, resize, square_crop, to_pil
from unclip.settings import SampleSettings, deterministic, merge_settings

# DDIM's eta for variations from an inverted latent: 0 reconstructs the image; 1 is as stochastic as
# ancestral sampling. 1: on the moved demo stack, whose decoder renders its scenes, every eta keeps the
# scene's content (91-95% of 64 variations) and 1 moves the layout most (docs/GENERATION.md, "Variations")
VARIATION_ETA = 1.0


class EmbeddingModes:
    def variations(self, image: ImageLike, num_images: int = 4, prompt: str | None = None, settings=None, **overrides):
        """New images of the image's CLIP embedding (unCLIP sec. 3.1), from its inverted latent."""
        s = merge_settings(settings, overrides)
        if prompt is not None:
            self._check_prompts(prompt)
        embed = self.embed_image(image, s.image_fit)
        seeds = [s.seed + j for j in range(num_images)]
        captions = None if prompt is None else [prompt] * num_images
        embeds = embed.expand(num_images, -1)
        if s.start == "noise":
            images = self._generate(s, seeds, embeds=embeds, captions=captions)
        else:
            eta = VARIATION_ETA if s.decoder_eta is None else s.decoder_eta
            s = replace(s, decoder_sampler="ddim", decoder_eta=eta)
            with self.steps.call(self._inversion_steps(s) + self._work(s, num_images, False, False)):
                latent = self.invert(image, embed, s, prompt)
                images = self._generate(
                    s, seeds, embeds=embeds, captions=captions, latents=latent.expand(num_images, -1, -1, -1)
                )
        records = [{"prompt": prompt, "seed": x} for x in seeds]
        return self._generation(to_pil(images), records, s, "variations")

    def interpolate(self, image_a: ImageLike, image_b: ImageLike, frames: int = 5, settings=None, **overrides):
        """Slerp between two images' CLIP embeddings (unCLIP sec. 3.2, fig. 4), and between their
        inverted latents, every frame decoded with DDIM at eta 0: the ends are the two images."""
        s = deterministic(merge_settings(settings, overrides))
        a, b = self.embed_image(image_a, s.image_fit), self.embed_image(image_b, s.image_fit)
        ts = np.linspace(0.0, 1.0, frames).tolist()
        embeds = torch.cat([slerp(a, b, t) for t in ts])
        if s.start == "noise":
            images = self._generate(s, [s.seed] * frames, embeds=embeds)
        else:
            with self.steps.call(2 * self._inversion_steps(s) + self._work(s, frames, False, False)):
                la, lb = self.invert(image_a, a, s), self.invert(image_b, b, s)
                latents = torch.cat([slerp_latents(la, lb, t) for t in ts])
                images = self._generate(s, [s.seed] * frames, embeds=embeds, latents=latents)
        records = [{"prompt": None, "seed": s.seed, "t": t} for t in ts]
        return self._generation(to_pil(images), records, s, "interpolate")

    def text_diff(
        self,
        image: ImageLike,
        from_caption: str,
        to_caption: str,
        frames: int = 5,
        max_angle: float = 0.5,
        settings=None,
        **overrides,
    ):
        """Move the image's embedding toward the normalized difference of two caption embeddings,
        slerp(z_i, z_d, theta) for theta in [0, max_angle] (unCLIP sec. 3.3, fig. 5), every frame from the
        image's inverted latent with DDIM at eta 0: the first frame is the image."""
        s = deterministic(merge_settings(settings, overrides))
        if not 0 <= max_angle <= 1:  # also false for nan
            raise ValueError(
                f"max_angle must be in [0, 1] (a fraction of the turn to the new caption), got {max_angle}"
            )
        self._check_prompts(from_caption, to_caption)
        z_i = self.embed_image(image, s.image_fit)
        text = F.normalize(self.clip.encode_captions([from_caption, to_caption]).embedding.float(), dim=-1)
        z_d = F.normalize(text[1:] - text[:1], dim=-1)
        thetas = np.linspace(0.0, max_angle, frames).tolist()
        embeds = torch.cat([slerp(z_i, z_d, th) for th in thetas])
        if s.start == "noise":
            images = self._generate(s, [s.seed] * frames, embeds=embeds)
        else:
            with self.steps.call(self._inversion_steps(s) + self._work(s, frames, False, False)):
                latent = self.invert(image, z_i, s).expand(frames, -1, -1, -1)
                images = self._generate(s, [s.seed] * frames, embeds=embeds, latents=latent)
        records = [
            {"prompt": None, "seed": s.seed, "theta": th, "from": from_caption, "to": to_caption} for th in thetas
        ]
        return self._generation(to_pil(images), records, s, "text_diff")

    # --- the inversion -------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(
        self, image: ImageLike, embed: torch.Tensor, settings: SampleSettings | None = None, prompt: str | None = None
    ) -> torch.Tensor:
        """(1, 3, R, R): the decoder's DDIM-inverted latent of `image` (its centre crop at the decoder's
        size R) given its CLIP image embedding, on the decoder's sampling steps and under what the decode
        will read (the prompt if any, the negative prompt, the guidance: Pipeline._decoder_conditioning);
        in fp32, whatever the pipeline's precision (the inversion's error adds up over every step)."""
        s = settings or SampleSettings()
        size = self.decoder.image_size
        pixels = resize(square_crop(load_image(image)), (size, size)).to(self.device)
        decoder = self.resolve(s)["decoder"]
        self.steps.stage("inversion")
        caption, guide = self._decoder_conditioning(None if prompt is None else [prompt], 1, s, decoder["guidance"])
        embed = embed.to(self.device)
        return self.decoder.invert(pixels, embed, caption, steps=decoder["steps"], on_step=self.steps.tick, **guide)

    def _inversion_steps(self, s: SampleSettings) -> int:
        return self.decoder.diffusion.respaced(self.resolve(s)["decoder"]["steps"]).num_steps


def slerp_latents(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Between two latents (B, ...): slerp of their directions, linear in their norms, so every frame
    stays a latent of the scale the decoder expects."""
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    na, nb = fa.norm(dim=-1, keepdim=True), fb.norm(dim=-1, keepdim=True)
    direction = slerp(fa / na, fb / nb, t)
    return (direction * ((1 - t) * na + t * nb)).reshape(a.shape).to(a.dtype)
