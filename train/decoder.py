"""python -m train.decoder: the 64px decoder, CLIP image embedding (+ caption) -> image.

    python -m train.decoder experiment=demo_decoder              # what make demo runs
    torchrun --standalone --nproc_per_node 8 -m train.decoder model/decoder=paper64 model/clip=ViT-L-14 \\
        model.clip.checkpoint=/models/ViT-L-14.pt data=webdataset data.shards='/data/laion/{00000..09999}.tar' \\
        data.embeddings=/data/laion-emb distributed=zero2 precision=bf16 trainer.batch_global=2048

Image embeddings come precomputed (data.embeddings, joined by key) or from the frozen CLIP in the
loop; captions from the frozen CLIP's token outputs, or GLIDE's own text transformer trained with
the decoder (model.decoder.text_encoder=transformer). Sample grids show held-out images, their
reconstructions from their own embeddings, and, with task.prior=<prior export>, images decoded from
the captions through the prior.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data.loader import DataConfig
from train.cli import check_overrides
from train.conditioning import (
    check_companion,
    check_embeddings,
    image_embeddings,
    pixels,
    read_at_clip_resolution,
    read_prompts,
)
from train.config import DecoderJob
from train.profiling import phase
from train.run import main as run_main
from train.run import run
from train.task import Grid, Task, TaskContext
from unclip.clip import ClipEncoder, build_clip
from unclip.decoder import Decoder
from unclip.diffusion import make_generator
from unclip.images import resize
from unclip.masks import random_masks
from unclip.prior import load_prior


def _unwrap(model):
    return getattr(model, "module", model)


class DecoderTask(Task):
    kind = "decoder"

    def __init__(self, job: DecoderJob):
        self.job = job
        self.cfg = job.model.decoder
        self.clip_cfg = replace(job.model.clip, frozen=True)
        self.prior = None

    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        size = self.cfg.unet.image_size
        if self.job.data.resolution != size:
            raise ValueError(
                f"data.resolution={self.job.data.resolution} but the decoder is built for {size}px "
                f"images: set data.resolution={size}"
            )
        self.clip: ClipEncoder = build_clip(self.clip_cfg, ctx.device)
        self.fingerprint = self.clip.fingerprint()
        for folder in (self.job.data.embeddings, self.job.data.heldout_embeddings):
            if folder:
                check_embeddings(folder, self.clip, self.clip_cfg)
        if self.job.task.prior:
            check_companion(self.job.task.prior, "prior", self.fingerprint, self.clip_cfg, self.kind)
            self.prior = load_prior(self.job.task.prior, ctx.device)
            if self.prior.embed_dim != self.clip.embed_dim:
                raise ValueError(
                    f"task.prior={self.job.task.prior} samples {self.prior.embed_dim}-d embeddings; "
                    f"this decoder's CLIP makes {self.clip.embed_dim}-d ones"
                )
        self.prompts = read_prompts(self.job.task.sample_prompts) if self.job.task.sample_prompts else []
        if self.prompts and self.prior is None:
            raise ValueError(
                "task.sample_prompts needs task.prior (a prior export) to turn the captions into image embeddings"
            )

    def data_config(self, data: DataConfig) -> DataConfig:
        return read_at_clip_resolution(data, self.clip, at_least=self.cfg.unet.image_size)

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images at the decoder's size in [-1, 1], their CLIP image embeddings). With CLIP in the
        loop the loader reads images at CLIP's resolution: CLIP embeds those, the decoder gets them
        downsampled, as the precomputed-embedding path (data.embed) sees them."""
        images = pixels(batch, self.ctx.device)
        embed = image_embeddings(batch, self.clip, self.ctx.device)
        size = self.cfg.unet.image_size
        if images.shape[-1] != size:
            images = resize(images, (size, size))
        return images, embed

    def build_model(self) -> Decoder:
        return Decoder(self.cfg, self.clip.embed_dim, self.clip.text_width)

    # --- batches -----------------------------------------------------------------------------------
    def drop_masks(self, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent classifier-free guidance dropout of the image embedding and of the caption."""
        drop_image = torch.rand(b, device=device) < self.cfg.image_drop_prob
        drop_text = torch.rand(b, device=device) < self.cfg.text_drop_prob
        return drop_image, drop_text

    def _inpainting(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """For the inpainting variant: random rectangle / stroke masks and the image with the holes zeroed.
        The mask seed comes from the global RNG, so a resumed run draws the same masks."""
        if not self.cfg.unet.inpaint:
            return {}
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        mask = random_masks(len(x0), x0.shape[-1], seed).to(x0.device)
        return {"inpaint_image": x0 * mask, "inpaint_mask": mask}

    def loss(self, model, batch):
        decoder: Decoder = _unwrap(model)
        device = self.ctx.device
        x0, embed = self.inputs(batch)
        with phase("caption_inputs"):  # the frozen CLIP's text tower, when the decoder reads the caption
            text = decoder.caption_inputs(batch["caption"], self.clip)
        b = len(x0)
        diffusion = decoder.diffusion
        i = diffusion.training_timesteps(b, device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, i, noise)
        drop_image, drop_text = self.drop_masks(b, device)
        out = model(
            x_t,
            diffusion.model_timesteps(i),
            embed,
            drop_image=drop_image,
            drop_text=drop_text,
            **text,
            **self._inpainting(x0),
        )
        loss, terms = diffusion.training_loss(out, x0, x_t, noise, i)
        return loss.mean(), {f"decoder/{k}": v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, model, batches) -> dict[str, float]:
        """The diffusion loss on held-out images at fixed noise levels and noise (comparable across runs)."""
        decoder: Decoder = model
        totals: dict[str, float] = {}
        gen = make_generator(self.ctx.seed * 31 + self.ctx.rank, self.ctx.device)
        for batch in batches:
            x0, embed = self.inputs(batch)
            text = decoder.caption_inputs(batch["caption"], self.clip)
            i = torch.randint(0, decoder.diffusion.num_steps, (len(x0),), generator=gen, device=self.ctx.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.ctx.device)
            x_t = decoder.diffusion.q_sample(x0, i, noise)
            out = decoder(x_t, decoder.diffusion.model_timesteps(i), embed, **text)
            _, terms = decoder.diffusion.training_loss(out, x0, x_t, noise, i)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.mean().item() / len(batches)
        return totals

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        """FD-CLIP between held-out images and images decoded for their captions (through task.prior
        when given, else from their own embeddings), and those images' CLIP score, in the frozen CLIP."""
        from train.online_eval import ClipSpaceEval

        decoder: Decoder = model
        ev = ClipSpaceEval(self.clip.embed_dim)
        kwargs = {"steps": self.job.task.sample_steps, "guidance_scale": self.job.task.sample_guidance}
        for n, batch in enumerate(batches):
            captions = batch["caption"]
            real, embed = self.inputs(batch)
            enc = self.clip.encode_captions(captions)
            seed = self.ctx.seed * 7919 + self.ctx.rank * 101 + n
            if self.prior is not None:
                embed = self.prior.sample(enc.embedding, enc.tokens, enc.mask, generator=make_generator(seed))
            text = decoder.caption_inputs(captions, self.clip)
            fake = decoder.sample(embed, generator=make_generator(seed + 1, self.ctx.device), **text, **kwargs)
            features = [F.normalize(self.clip.encode_image(x).float(), dim=-1) for x in (real, fake)]
            ev.update(*features, F.normalize(enc.embedding.float(), dim=-1))
        return ev.compute()

    @torch.no_grad()
    def sample(self, model, batch) -> Grid:
        """Rows: held-out images; their reconstructions from their own CLIP image embeddings; with a
        prior, images from their captions (prior -> decoder). One seed, so grids compare across steps."""
        decoder: Decoder = model
        n = min(self.job.task.sample_count, len(batch["caption"]))
        batch = {k: v[:n] for k, v in batch.items()}
        captions = batch["caption"]
        text = decoder.caption_inputs(captions, self.clip)
        kwargs = {"steps": self.job.task.sample_steps, "guidance_scale": self.job.task.sample_guidance}
        truth, embed = self.inputs(batch)
        rows = [truth, decoder.sample(embed, generator=make_generator(0, self.ctx.device), **text, **kwargs)]
        labels = [f"real: {c}" for c in captions] + [f"from its embedding: {c}" for c in captions]
        if self.prior is not None:
            enc = self.clip.encode_captions(captions)
            sampled = self.prior.sample(
                enc.embedding, enc.tokens, enc.mask, generator=make_generator(1, self.ctx.device)
            )
            rows.append(decoder.sample(sampled, generator=make_generator(2, self.ctx.device), **text, **kwargs))
            labels += [f"from the caption: {c}" for c in captions]
        if self.prompts:  # the user's validation prompts, through the prior, with one seed
            enc = self.clip.encode_captions(self.prompts)
            sampled = self.prior.sample(enc.embedding, enc.tokens, enc.mask, generator=make_generator(3))
            text = decoder.caption_inputs(self.prompts, self.clip)
            rows.append(decoder.sample(sampled, generator=make_generator(4, self.ctx.device), **text, **kwargs))
            labels += [f"your prompt: {c}" for c in self.prompts]
        return Grid(torch.cat(rows), labels, columns=n)

    def export_config(self, model) -> dict[str, Any]:
        clip = asdict(self.clip_cfg)
        if clip["checkpoint"]:
            clip["checkpoint"] = str(Path(clip["checkpoint"]).resolve())
        return _unwrap(model).export_config() | {"clip": clip, "clip_fingerprint": self.fingerprint}

    def summary(self, metrics: dict[str, float]) -> str | None:
        if "val/mse" not in metrics:
            return None
        return f"held-out decoder loss: mse {metrics['val/mse']:.4f}; sample grids in {self.job.run_dir / 'samples'}"


def train(job: DecoderJob) -> int:
    return run(job, DecoderTask(job))


@hydra.main(config_path="../conf", config_name="decoder", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, DecoderTask)


if __name__ == "__main__":
    check_overrides()
    main()
