"""The generation pipeline: every DALL-E 2 mode from a trained stack's exports.

    pipe = Pipeline.from_exports(prior="runs/prior/export", decoder="runs/decoder/export",
                                 up256="runs/up256/export")          # up1024=..., clip=... optional
    out = pipe.text_to_image(["a red star on a blue background"], num_images=4, seed=0)
    out.images[0].save("star.png")

Text-to-image runs caption -> CLIP -> prior (best of N) -> decoder (guided) -> upsamplers (unCLIP
sec. 2). Variations, interpolations and text diffs decode CLIP image embeddings (sec. 3); inpainting
and outpainting repaint a region at every stage (GLIDE's inpainting decoder when the export is one,
RePaint on any other). Every method returns a Generation: the images, their seeds and the settings
used. Image j of every prompt uses seed + j, and each stage draws from its own generator derived
from that seed, so an image is the same whatever the batch, the rank or the other prompts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unclip.clip import ClipConfig, ClipEncoder
from unclip.decoder import Decoder
from unclip.diffusion import model_calls
from unclip.editing import SIDES, extend_canvas, extension, plan_tiles, slerp
from unclip.images import ImageLike, load_image, load_mask, paste, resize, resize_mask, to_pil, to_uint8
from unclip.prior import DiffusionPrior
from unclip.progress import StepProgress
from unclip.safety import PromptFilter
from unclip.settings import SampleSettings, deterministic, merge_settings, sampler_settings
from unclip.stack import UPSAMPLERS, ExportInfo, check_chain, load_stack
from unclip.upsampler import Upsampler

_STAGE_IDS = {"prior": 1, "decoder": 2, "up256": 3, "up1024": 4}


@dataclass
class Generation:
    """What a pipeline call made: images (PIL, the final stage's size, or the input's for edits), one
    record per image (prompt, seed, mode extras), the resolved settings, and refused prompts."""

    images: list[Image.Image]
    records: list[dict[str, Any]]
    settings: dict[str, Any]
    refused: list[tuple[str, str]] = field(default_factory=list)
    keep: np.ndarray | None = None  # edits: (H, W) True where the input's pixels were kept (marks leave them be)

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.records]


def stage_generators(seeds: list[int], stage: str, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per image for one stage: a pure function of (seed, stage, salt), so changing
    one stage's steps never changes another stage's noise."""
    gens = []
    for seed in seeds:
        hi, lo = np.random.SeedSequence([seed, _STAGE_IDS[stage], salt]).generate_state(2)
        gens.append(torch.Generator().manual_seed((int(hi) << 31) ^ int(lo)))
    return gens


class Pipeline:
    def __init__(
        self,
        clip: ClipEncoder,
        decoder: Decoder,
        prior: DiffusionPrior | None = None,
        upsamplers: dict[str, Upsampler] | None = None,
        exports: dict[str, ExportInfo] | None = None,
        *,
        precision: str = "fp32",
        progress: bool | None = None,
        prompt_filter: PromptFilter | None = None,
        channels_last: bool = True,
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.clip, self.decoder, self.prior = clip, decoder, prior
        self.upsamplers = dict(upsamplers or {})
        if channels_last:  # the layout oneDNN and cuDNN convolutions prefer: 1.2x (benchmarks/sampling.py)
            for up in self.upsamplers.values():
                up.to(memory_format=torch.channels_last)
        self.exports = dict(exports or {})
        self.precision = precision
        self.steps = StepProgress(progress)  # a bar on a terminal (progress None), and the server's listener
        self.prompt_filter = prompt_filter
        self.device = next(decoder.parameters()).device
        check_chain(decoder, self.upsamplers)

    # --- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_exports(
        cls,
        *,
        decoder: str | Path,
        prior: str | Path | None = None,
        up256: str | Path | None = None,
        up1024: str | Path | None = None,
        clip: str | Path | ClipConfig | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        progress: bool | None = None,
        prompt_filter: PromptFilter | None | str = "default",
        channels_last: bool = True,
    ) -> Pipeline:
        """Load a stack from training exports (runs/<name>/export). The CLIP comes from the decoder's
        export record unless given; every stage must have been trained with that CLIP, and the
        resolutions must chain (64 -> 256 -> 1024). prompt_filter: "default" (the shipped blocklist),
        a PromptFilter, or None."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        stack = load_stack(decoder=decoder, prior=prior, up256=up256, up1024=up1024, clip=clip, device=device)
        if prompt_filter == "default":
            prompt_filter = PromptFilter.default()
        return cls(
            stack.clip,
            stack.decoder,
            stack.prior,
            stack.upsamplers,
            stack.exports,
            precision=precision,
            progress=progress,
            prompt_filter=prompt_filter,
            channels_last=channels_last,
        )

    # --- sizes and settings ------------------------------------------------------------------------
    def stages(self, stop_at: int | None = None) -> list[str]:
        """The image stages that run: the decoder, then the upsamplers up to `stop_at` pixels."""
        names, size = ["decoder"], self.decoder.image_size
        for name in UPSAMPLERS:
            if name in self.upsamplers and (stop_at is None or size < stop_at):
                names.append(name)
                size = self.upsamplers[name].cfg.target_size
        if stop_at is not None and size != stop_at:
            sizes = [self.decoder.image_size] + [self.upsamplers[n].cfg.target_size for n in self.upsamplers]
            raise ValueError(f"stop_at={stop_at}: this stack makes images of {sizes} pixels")
        return names

    def output_size(self, stop_at: int | None = None) -> int:
        last = self.stages(stop_at)[-1]
        return self.decoder.image_size if last == "decoder" else self.upsamplers[last].cfg.target_size

    def resolve(self, s: SampleSettings) -> dict[str, dict[str, Any]]:
        """The settings each stage runs with: the caller's, or else the export's."""
        out: dict[str, dict[str, Any]] = {}
        if self.prior is not None:
            p = self.prior.cfg
            out["prior"] = {
                "steps": s.prior_steps or p.diffusion.sample_steps,
                "guidance": p.guidance_scale if s.prior_guidance is None else s.prior_guidance,
                "candidates": s.prior_candidates or p.num_candidates,
            }
        d = self.decoder.cfg
        out["decoder"] = sampler_settings(s, "decoder", d.diffusion) | {
            "guidance": d.guidance_scale if s.decoder_guidance is None else s.decoder_guidance
        }
        for name in self.stages(s.stop_at)[1:]:
            out[name] = sampler_settings(s, name, self.upsamplers[name].cfg.diffusion)
        return out

    def describe(self, s: SampleSettings, mode: str) -> dict[str, Any]:
        """What provenance records of a call: mode, stage settings, exports, CLIP, precision."""
        return {
            "mode": mode,
            "stages": self.resolve(s),
            "seed": s.seed,
            "negative_prompt": s.negative_prompt,
            "batch_size": s.batch_size,
            "precision": self.precision,
            "exports": {name: asdict(info) for name, info in self.exports.items()},
            "clip": {"fingerprint": self.clip.fingerprint(), "arch": self.clip.config.arch},
        }

    # --- the modes ---------------------------------------------------------------------------------
    def text_to_image(
        self,
        prompts: str | list[str],
        num_images: int = 4,
        settings: SampleSettings | None = None,
        seeds: list[int] | None = None,
        **overrides,
    ) -> Generation:
        """Caption -> CLIP text embedding -> prior -> decoder -> upsamplers. Prompts the filter refuses
        are skipped and listed in `refused`. With rerank=N > num_images, N candidates per prompt are
        drawn and the num_images with the highest CLIP score kept, best first. `seeds`: one per prompt,
        the seed of its first image (default: settings.seed for every prompt)."""
        s = merge_settings(settings, overrides)
        if self.prior is None:
            raise ValueError("text-to-image needs a prior: load the stack with prior=<prior export>")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        firsts = seeds if seeds is not None else [s.seed] * len(prompts)
        reasons = [self.prompt_filter.check(p) if self.prompt_filter else None for p in prompts]
        refused = [(p, r) for p, r in zip(prompts, reasons) if r]
        kept = [(p, seed) for p, seed, r in zip(prompts, firsts, reasons) if not r]
        allowed = [p for p, _ in kept]
        draws = max(num_images, s.rerank)
        captions = [p for p in allowed for _ in range(draws)]
        seeds = [first + j for _, first in kept for j in range(draws)]
        images = self._generate(s, seeds, captions=captions)
        scores = self.clip_scores(images, captions, s.batch_size)
        records = [{"prompt": c, "seed": seed, "clip_score": sc} for c, seed, sc in zip(captions, seeds, scores)]
        if draws > num_images:  # keep the best num_images of each prompt's candidates
            keep = []
            for p in range(len(allowed)):
                group = list(range(p * draws, (p + 1) * draws))
                keep += sorted(group, key=lambda k: -scores[k])[:num_images]
            images, records = images[keep], [records[k] for k in keep]
        return Generation(to_pil(images), records, self.describe(s, "text") | {"rerank": s.rerank}, refused)

    def variations(
        self, image: ImageLike, num_images: int = 4, prompt: str | None = None, settings=None, **overrides
    ) -> Generation:
        """The image's CLIP embedding decoded with fresh noise (unCLIP sec. 3.1)."""
        s = merge_settings(settings, overrides)
        embed = self.embed_image(image)
        seeds = [s.seed + j for j in range(num_images)]
        images = self._generate(s, seeds, embeds=embed.expand(num_images, -1), captions=_repeat(prompt, num_images))
        return Generation(
            to_pil(images), [{"prompt": prompt, "seed": x} for x in seeds], self.describe(s, "variations")
        )

    def interpolate(
        self, image_a: ImageLike, image_b: ImageLike, frames: int = 5, settings=None, **overrides
    ) -> Generation:
        """Slerp between two images' CLIP embeddings, every frame decoded from the same noise with
        DDIM (eta 0 unless set), so only the embedding moves (unCLIP sec. 3.2, fig. 4)."""
        s = deterministic(merge_settings(settings, overrides))
        a, b = self.embed_image(image_a), self.embed_image(image_b)
        ts = np.linspace(0.0, 1.0, frames).tolist()
        embeds = torch.cat([slerp(a, b, t) for t in ts])
        images = self._generate(s, [s.seed] * frames, embeds=embeds)
        records = [{"prompt": None, "seed": s.seed, "t": t} for t in ts]
        return Generation(to_pil(images), records, self.describe(s, "interpolate"))

    def text_diff(
        self,
        image: ImageLike,
        from_caption: str,
        to_caption: str,
        frames: int = 5,
        max_angle: float = 0.5,
        settings=None,
        **overrides,
    ) -> Generation:
        """Move the image's embedding toward the normalized difference of two caption embeddings,
        slerp(z_i, z_d, theta) for theta in [0, max_angle], from fixed noise (unCLIP sec. 3.3, fig. 5)."""
        s = deterministic(merge_settings(settings, overrides))
        if not 0 <= max_angle <= 1:  # also false for nan
            raise ValueError(
                f"max_angle must be in [0, 1] (a fraction of the way to the caption change), got {max_angle}"
            )
        self._check_prompts(from_caption, to_caption)
        z_i = self.embed_image(image)
        text = self.clip.encode_captions([from_caption, to_caption]).embedding.float()
        text = torch.nn.functional.normalize(text, dim=-1)
        z_d = torch.nn.functional.normalize(text[1:] - text[:1], dim=-1)
        thetas = np.linspace(0.0, max_angle, frames).tolist()
        embeds = torch.cat([slerp(z_i, z_d, th) for th in thetas])
        images = self._generate(s, [s.seed] * frames, embeds=embeds)
        records = [
            {"prompt": None, "seed": s.seed, "theta": th, "from": from_caption, "to": to_caption} for th in thetas
        ]
        return Generation(to_pil(images), records, self.describe(s, "text_diff"))

    def inpaint(
        self,
        image: ImageLike,
        mask: ImageLike,
        prompt: str | None = None,
        num_images: int = 1,
        settings=None,
        **overrides,
    ) -> Generation:
        """Repaint the masked region (see unclip.images.load_mask for the conventions), guided by the
        prompt through the prior, or by the image's own embedding without one. The result has the
        input's size and equals it exactly outside the mask."""
        s = merge_settings(settings, overrides)
        original = load_image(image)
        keep = load_mask(mask, tuple(original.shape[-2:]))
        size = self.output_size(s.stop_at)
        known, known_keep = resize(original, (size, size)), resize_mask(keep, (size, size))
        seeds = [s.seed + j for j in range(num_images)]
        embeds, captions = self._edit_conditioning(original, prompt, seeds, s)
        out = self._generate(
            s,
            seeds,
            embeds=embeds,
            captions=captions,
            known=known.expand(num_images, -1, -1, -1),
            keep=known_keep.expand(num_images, -1, -1, -1),
        )
        out = to_uint8(resize(out.float() / 127.5 - 1, tuple(original.shape[-2:])))
        final = paste(to_uint8(original), out, keep, s.feather)
        records = [{"prompt": prompt, "seed": x} for x in seeds]
        return Generation(to_pil(final), records, self.describe(s, "inpaint"), keep=keep[0, 0].bool().numpy())

    def outpaint(
        self,
        image: ImageLike,
        extend: dict[str, int] | tuple[int, int, int, int] | None = None,
        aspect: str | float | None = None,
        prompt: str | None = None,
        num_images: int = 1,
        overlap: float = 0.5,
        settings=None,
        **overrides,
    ) -> Generation:
        """Grow the canvas (pixels per side, or to an aspect ratio) and fill the new region tile by tile,
        each tile inpainted over what exists (DALL-E 2's editor). Tiles are the stack's output size at
        the scale where the original fills one tile; the original pixels are kept exactly."""
        s = merge_settings(settings, overrides)
        if not 0 <= overlap < 1:  # also false for nan
            raise ValueError(f"overlap must be in [0, 1) (the fraction of a tile over what exists), got {overlap}")
        original = load_image(image)
        h, w = original.shape[-2:]
        sides = extension(h, w, extend, aspect)
        canvas, keep = extend_canvas(original, sides)
        tile = self.output_size(s.stop_at)
        scale = tile / max(h, w)  # the original fills one tile, as the models saw whole scenes
        work_size = (max(tile, round(canvas.shape[-2] * scale)), max(tile, round(canvas.shape[-1] * scale)))
        work, work_keep = resize(canvas, work_size), resize_mask(keep, work_size)
        work = work.expand(num_images, -1, -1, -1).clone()
        known = work_keep.expand(num_images, -1, -1, -1).clone()
        plan = plan_tiles(work_keep[0, 0].numpy() > 0.5, tile, max(1, round(tile * (1 - overlap))))
        seeds = [s.seed + j for j in range(num_images)]
        embeds, captions = self._edit_conditioning(original, prompt, seeds, s)
        work_per_tile = self._work(s, num_images, prompt is not None, editing=True)
        with self.steps.call(len(plan) * work_per_tile):
            self._fill_tiles(s, plan, tile, work, known, seeds, embeds, captions)
        out = to_uint8(resize(work, tuple(canvas.shape[-2:])))
        final = paste(to_uint8(canvas), out, keep, 0)  # tiles already painted around the original: no feather
        added = dict(zip(SIDES, sides))
        records = [{"prompt": prompt, "seed": x, "extend": added} for x in seeds]
        described = self.describe(s, "outpaint") | {"tiles": len(plan)}
        return Generation(to_pil(final), records, described, keep=keep[0, 0].bool().numpy())

    # --- building blocks ---------------------------------------------------------------------------
    def _fill_tiles(self, s, plan, tile, work, known, seeds, embeds, captions) -> None:
        """Inpaint each window of the plan in turn, over what exists by then; edits work in place."""
        for n, (top, left) in enumerate(plan):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            filled = self._generate(
                s, seeds, embeds=embeds, captions=captions, known=work[window], keep=known[window], salt=n + 1
            )
            work[window] = torch.where(known[window].bool(), work[window], filled.float() / 127.5 - 1)
            known[window] = 1.0

    @torch.no_grad()
    def embed_image(self, image: ImageLike) -> torch.Tensor:
        """(1, D) unit-norm CLIP image embedding."""
        pixels = load_image(image).to(self.device)
        return torch.nn.functional.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def clip_scores(self, images: torch.Tensor, captions: list[str], batch_size: int = 32) -> list[float]:
        """100 x max(cos(image, caption), 0) per image, with the stack's CLIP."""
        out = []
        for i in range(0, len(captions), batch_size):
            pixels = images[i : i + batch_size].to(self.device).float() / 127.5 - 1
            out += (100 * self.clip.similarity(pixels, captions[i : i + batch_size]).clamp(min=0)).tolist()
        return out

    def _edit_conditioning(self, original, prompt, seeds, s) -> tuple[torch.Tensor | None, list[str] | None]:
        """Edits follow the prompt through the prior when there is one, else the image's own embedding."""
        if prompt is None:
            return self.embed_image(original).expand(len(seeds), -1), None
        self._check_prompts(prompt)
        if self.prior is None:
            raise ValueError("an edit guided by a prompt needs a prior: load the stack with prior=<export>")
        return None, [prompt] * len(seeds)

    def _check_prompts(self, *prompts: str) -> None:
        """An edit has one prompt (or two): a refused one stops it, with the filter's reason."""
        if self.prompt_filter is not None:
            _, refused = self.prompt_filter.split(list(prompts))
            if refused:
                raise ValueError(f"refused: {refused[0][0]!r} ({refused[0][1]})")

    @torch.no_grad()
    def _generate(self, s, seeds, *, captions=None, embeds=None, known=None, keep=None, salt=0) -> torch.Tensor:
        """uint8 (N, 3, R, R): the prior (when only captions are given), then every image stage, in
        batches of s.batch_size. known / keep (N, 3|1, R, R): inpaint, keeping known where keep is 1."""
        s.validate()
        if not seeds:
            raise ValueError("nothing to generate: num_images (or frames) must be at least 1")
        stages = self.stages(s.stop_at)
        resolved = self.resolve(s)
        chunks = range(0, len(seeds), s.batch_size)
        out = []
        with self.steps.call(self._work(s, len(seeds), embeds is None, known is not None)), self._autocast():
            for i in chunks:
                part = slice(i, i + s.batch_size)
                cap = captions[part] if captions is not None else None
                emb = embeds[part] if embeds is not None else self._prior(cap, seeds[part], resolved["prior"], salt, s)
                x = None
                for stage in stages:
                    k = None if known is None else (known[part], keep[part])
                    x = self._stage(stage, x, emb, cap, seeds[part], resolved[stage], k, s, salt)
                out.append(to_uint8(x).cpu())
        return torch.cat(out)

    def _prior(self, captions, seeds, cfg, salt, s) -> torch.Tensor:
        self.steps.stage("prior")
        text = self.clip.encode_captions(captions)
        negative = None
        if s.negative_prompt is not None:
            neg = self.clip.encode_captions([s.negative_prompt])
            negative = (neg.embedding, neg.tokens, neg.mask)
        return self.prior.sample(
            text.embedding,
            text.tokens,
            text.mask,
            negative=negative,
            num_candidates=cfg["candidates"],
            guidance_scale=cfg["guidance"],
            steps=cfg["steps"],
            generator=stage_generators(seeds, "prior", salt),
            on_step=self.steps.tick,
        )

    def _stage(self, stage, x, embeds, captions, seeds, cfg, known, s, salt) -> torch.Tensor:
        """One image stage: the decoder (x is None) or an upsampler of x; known = (images, keep) at
        the final size, brought to this stage's size."""
        self.steps.stage(stage)
        gens = stage_generators(seeds, stage, salt)
        common = {"steps": cfg["steps"], "sampler": cfg["sampler"], "eta": cfg["eta"], "generator": gens}
        edit: dict[str, Any] = {}
        if stage == "decoder":
            size = self.decoder.image_size
            if known is not None:
                img, keep = resize(known[0], (size, size)).to(self.device), resize_mask(known[1], (size, size))
                keep = keep.to(self.device)
                if self.decoder.cfg.unet.inpaint:  # GLIDE's inpainting decoder sees the known region
                    edit = {"inpaint_image": img, "inpaint_mask": keep}
                else:
                    edit = {"known": img, "known_mask": keep, "jump_length": s.jump_length}
                    edit["jump_n_sample"] = s.jump_n_sample
            caption = self.decoder.caption_inputs(captions or [""] * len(seeds), self.clip)
            negative = None
            if s.negative_prompt is not None:
                negative = self.decoder.caption_inputs([s.negative_prompt] * len(seeds), self.clip)
            return self.decoder.sample(
                embeds.to(self.device),
                **caption,
                drop_caption=captions is None,
                negative=negative,
                guidance_scale=cfg["guidance"],
                on_step=self.steps.tick,
                **common,
                **edit,
            )
        up = self.upsamplers[stage]
        if known is not None:
            size = up.cfg.target_size
            edit = {"known": resize(known[0], (size, size)).to(self.device)}
            edit["known_mask"] = resize_mask(known[1], (size, size)).to(self.device)
        return up.sample(x.float(), on_step=self.steps.tick, **common, **edit)

    # --- progress and precision ----------------------------------------------------------------------
    def _work(self, s: SampleSettings, n: int, with_prior: bool, editing: bool) -> int:
        """Reverse steps (model calls) that _generate takes for n images: the progress bar's total."""
        resolved = self.resolve(s)

        def steps(stage: str) -> int:
            model = {"prior": self.prior, "decoder": self.decoder}.get(stage) or self.upsamplers[stage]
            return model.diffusion.respaced(resolved[stage]["steps"]).num_steps

        per_batch = steps("prior") if with_prior else 0
        for stage in self.stages(s.stop_at):
            if stage == "decoder" and editing and not self.decoder.cfg.unet.inpaint:
                per_batch += model_calls(steps(stage), s.jump_length, s.jump_n_sample)
            else:
                per_batch += steps(stage)
        return math.ceil(n / s.batch_size) * per_batch

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


# --- helpers ----------------------------------------------------------------------------------------
def _repeat(prompt: str | None, n: int) -> list[str] | None:
    return None if prompt is None else [prompt] * n


__all__ = ["Pipeline", "SampleSettings", "Generation", "stage_generators"]
