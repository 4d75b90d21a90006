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
from unclip.editing import SIDES, extend_canvas, extension, plan_tiles
from unclip.embedding_modes import EmbeddingModes
from unclip.images import ImageLike, load_image, load_mask, paste, resize, resize_mask, to_pil, to_uint8
from unclip.prior import DiffusionPrior
from unclip.progress import StepProgress
from unclip.safety import PromptFilter
from unclip.settings import SampleSettings, merge_settings, sampler_settings
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
    notes: list[str] = field(default_factory=list)  # what the call did not do as asked, in words

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


class Pipeline(EmbeddingModes):
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
        if not allowed:  # every prompt refused: nothing to make, and each refusal said
            return Generation([], [], self.describe(s, "text"), refused)
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
        notes = self.notes(allowed, s)
        return Generation(
            to_pil(images), records, self.describe(s, "text") | {"rerank": s.rerank}, refused, notes=notes
        )

    def notes(self, prompts: list[str], s: SampleSettings, prior: bool = True) -> list[str]:
        """What a call will not do as asked: a negative prompt nothing reads, prompts cut to the CLIP's context."""
        out = []
        if s.negative_prompt is not None:
            resolved = self.resolve(s)
            prior_reads = prior and self.prior is not None and resolved["prior"]["guidance"] != 1
            decoder_reads = self.decoder.reads_captions and resolved["decoder"]["guidance"] != 1
            if not (prior_reads or decoder_reads):
                out.append(
                    "the negative prompt changes nothing here: it is read by a guided prior (prior_guidance != 1) "
                    "or a guided decoder that reads captions (decoder_guidance != 1), and this call has neither"
                )
        for prompt in dict.fromkeys(prompts):
            kept = self.clip.kept_words(prompt)
            if kept is not None:
                context = self.clip.context_length
                out.append(f"prompt {prompt!r} is longer than the CLIP's {context} tokens: only {kept!r} was read")
        return out

    def _generation(self, images, records, s, mode: str, **extra) -> Generation:
        prompts = [r["prompt"] for r in records if r.get("prompt")] + [
            r[k] for r in records[:1] for k in ("from", "to") if k in r
        ]
        return Generation(images, records, self.describe(s, mode), notes=self.notes(prompts, s, prior=False), **extra)

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
        notes = self.notes([prompt] if prompt else [], s)
        return Generation(
            to_pil(final), records, self.describe(s, "inpaint"), keep=keep[0, 0].bool().numpy(), notes=notes
        )

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
        notes = self.notes([prompt] if prompt else [], s)
        return Generation(to_pil(final), records, described, keep=keep[0, 0].bool().numpy(), notes=notes)

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
    def embed_image(self, image: ImageLike, fit: str = "crop") -> torch.Tensor:
        """(1, D) unit-norm CLIP image embedding; a non-square image is centre-cropped (fit="pad": padded)."""
        pixels = load_image(image).to(self.device)
        return torch.nn.functional.normalize(self.clip.encode_image(pixels, fit).float(), dim=-1)

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
            return self.embed_image(original, s.image_fit).expand(len(seeds), -1), None
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
    def _generate(
        self, s, seeds, *, captions=None, embeds=None, known=None, keep=None, salt=0, latents=None
    ) -> torch.Tensor:
        """uint8 (N, 3, R, R): the prior (when only captions are given), then every image stage, in
        batches of s.batch_size. known / keep (N, 3|1, R, R): inpaint, keeping known where keep is 1.
        latents (N, 3, r, r): the decoder's starting latents (inverted images') instead of fresh noise."""
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
                x = None if latents is None else latents[part]  # the decoder starts from x when given
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
                # the known region, noised to each step's level, replaces x's after every step; GLIDE's
                # inpainting decoder also sees it as input, and needs no RePaint resampling
                edit = {"known": img, "known_mask": keep, "jump_length": s.jump_length}
                edit["jump_n_sample"] = s.jump_n_sample
                if self.decoder.cfg.unet.inpaint:
                    edit |= {"inpaint_image": img, "inpaint_mask": keep, "jump_n_sample": 1}
            caption, guide = self._decoder_conditioning(captions, len(seeds), s, cfg["guidance"])
            return self.decoder.sample(
                embeds.to(self.device),
                **caption,
                **guide,
                on_step=self.steps.tick,
                noise=None if x is None else x.to(self.device),
                **common,
                **edit,
            )
        up = self.upsamplers[stage]
        if known is not None:
            size = up.cfg.target_size
            edit = {"known": resize(known[0], (size, size)).to(self.device)}
            edit["known_mask"] = resize_mask(known[1], (size, size)).to(self.device)
        return up.sample(x.float(), on_step=self.steps.tick, **common, **edit)

    def _decoder_conditioning(self, captions, n: int, s: SampleSettings, guidance: float) -> tuple[dict, dict]:
        """What the decoder's model function reads besides x, t and the embedding, for n images: the
        captions' inputs (none given: the embedding alone), then how it guides (the negative prompt, the
        scale, as resolve() gives it). The decode and the DDIM inversion (embedding_modes) share it, so
        an inverted latent is decoded at eta 0 under the model it was inverted under."""
        caption = self.decoder.caption_inputs(captions or [""] * n, self.clip)
        negative = None
        if s.negative_prompt is not None:
            negative = self.decoder.caption_inputs([s.negative_prompt] * n, self.clip)
        return caption, {"drop_caption": captions is None, "negative": negative, "guidance_scale": guidance}

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
