"""python -m train.prior: the diffusion prior, CLIP text -> CLIP image embedding.

    python -m train.prior experiment=demo_prior            # what make demo runs (after train.clip, data.embed)
    torchrun --standalone --nproc_per_node 8 -m train.prior model/prior=paper_1b optim=prior_paper \\
        model/clip=ViT-L-14 model.clip.checkpoint=/models/ViT-L-14.pt \\
        data=webdataset data.embeddings=/data/laion-emb data.load_images=false distributed=zero2

Trains from precomputed embeddings (data.embeddings + data.load_images=false: the embedding folder
alone is read; the frozen CLIP text tower supplies the per-token outputs) or from images and
captions with the frozen CLIP in the loop. The CLIP must be the one the embeddings came from: a
mismatch is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data.loader import DataConfig, ShardLoader
from train.cli import check_overrides
from train.conditioning import (
    check_companion,
    check_embeddings,
    image_embeddings,
    read_at_clip_resolution,
    read_prompts,
)
from train.config import PriorJob
from train.run import main as run_main
from train.run import run
from train.task import Grid, Task, TaskContext
from unclip.clip import ClipEncoder, TextEncoding, build_clip
from unclip.decoder import load_decoder
from unclip.diffusion import make_generator
from unclip.prior import DiffusionPrior


def _unwrap(model):
    return getattr(model, "module", model)  # a DeepSpeed engine keeps the module under .module


class PriorTask(Task):
    kind = "prior"

    def __init__(self, job: PriorJob):
        self.job = job
        self.cfg = job.model.prior
        self.clip_cfg = replace(job.model.clip, frozen=True)

    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        self.clip: ClipEncoder = build_clip(self.clip_cfg, ctx.device)
        self.fingerprint = self.clip.fingerprint()
        for folder in (self.job.data.embeddings, self.job.data.heldout_embeddings):
            if folder:
                check_embeddings(folder, self.clip, self.clip_cfg)
        task = self.job.task
        self.decoder = None
        if task.decoder:
            check_companion(task.decoder, "decoder", self.fingerprint, self.clip_cfg, self.kind)
            self.decoder = load_decoder(task.decoder, ctx.device)
        self.prompts = read_prompts(task.sample_prompts) if task.sample_prompts else []
        if self.prompts and self.decoder is None:
            raise ValueError("task.sample_prompts needs task.decoder (a decoder export) to draw the prior's samples")

    # --- model -------------------------------------------------------------------------------------
    def build_model(self) -> DiffusionPrior:
        prior = DiffusionPrior(self.cfg, self.clip.embed_dim, self.clip.text_width, self.clip.context_length)
        if self.cfg.normalization == "stats":
            image, text = self._stats_sample()
            prior.set_stats(image, text)
        return prior

    def data_config(self, data: DataConfig) -> DataConfig:
        return read_at_clip_resolution(data, self.clip)

    @torch.no_grad()
    def _first_samples(
        self, count: int, need_tokens: bool | None = None
    ) -> Iterator[tuple[torch.Tensor, TextEncoding]]:
        """Encoded batches of the first `count` training samples, read in the same order on every
        rank, so every rank computes the same statistics and estimates."""
        in_order = {"resampled": False, "shuffle_buffer": 0, "num_workers": 0}
        data = DataConfig(**asdict(self.data_config(self.job.data)) | in_order)
        loader = ShardLoader(data, batch_size=min(256, count), repeat=False, shuffle=False, crop="center")
        seen = 0
        for batch in loader:
            yield self._encode(batch, need_tokens)
            seen += len(batch["caption"])
            if seen >= count:
                return

    def _stats_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = list(self._first_samples(self.job.task.stats_samples, need_tokens=False))
        return torch.cat([i.cpu() for i, _ in pairs]), torch.cat([t.embedding.cpu() for _, t in pairs])

    def before_export(self, model) -> None:
        """Analytic-DPM: the EMA prior's x0 error on task.variance_samples training samples."""
        prior: DiffusionPrior = _unwrap(model)
        if prior.cfg.diffusion.variance != "analytic" or self.job.task.variance_samples <= 0:
            return
        batches = self._first_samples(self.job.task.variance_samples)
        prior.measure_x0_error(batches, generator=make_generator(self.ctx.seed, self.ctx.device))

    # --- batches -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, batch: dict[str, Any], need_tokens: bool | None = None) -> tuple[torch.Tensor, TextEncoding]:
        """(raw CLIP image embeddings (B, D), text encoding) from precomputed embeddings or the frozen CLIP."""
        device = self.ctx.device
        image = image_embeddings(batch, self.clip, device)
        need_tokens = self.cfg.use_text_tokens if need_tokens is None else need_tokens
        if need_tokens or "text_emb" not in batch:
            text = self.clip.encode_captions(batch["caption"])
        else:  # embeddings only: no text tower at all
            text = TextEncoding(tokens=None, mask=None, embedding=batch["text_emb"].to(device).float())
        return image, text

    def loss(self, model, batch):
        prior: DiffusionPrior = _unwrap(model)
        image, text = self._encode(batch)
        x0 = prior.normalize_image(image)
        b = len(x0)
        diffusion = prior.diffusion
        i = diffusion.training_timesteps(b, x0.device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, i, noise)
        drop = torch.rand(b, device=x0.device) < self.cfg.cond_drop_prob
        out = model(x_t, diffusion.model_timesteps(i), text.embedding, text.tokens, text.mask, drop)
        loss, terms = diffusion.training_loss(out, x0, x_t, noise, i)
        return loss.mean(), {"prior/mse": terms["mse"].mean()}

    @torch.no_grad()
    def validate(self, model, batches) -> dict[str, float]:
        """Cosines of sampled image embeddings (best of N) on held-out captions, next to the baseline
        cosine(text, true image) and an unrelated caption's image."""
        sums: dict[str, float] = {}
        for n, batch in enumerate(batches):
            image, text = self._encode(batch)
            gen = make_generator(self.ctx.seed * 7919 + self.ctx.rank * 101 + n, self.ctx.device)
            pred = model.sample(text.embedding, text.tokens, text.mask, steps=self.job.task.val_steps, generator=gen)
            true = F.normalize(image, dim=-1)
            txt = F.normalize(text.embedding, dim=-1)
            values = {
                "cos_pred_image": (pred * true).sum(-1),
                "cos_pred_text": (pred * txt).sum(-1),
                "cos_text_image_baseline": (txt * true).sum(-1),
                "cos_pred_unrelated_image": (pred * true.roll(1, dims=0)).sum(-1),
            }
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v.mean().item()
        return {k: v / max(1, len(batches)) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, model, batches) -> dict[str, float]:
        """FD-CLIP between sampled and true image embeddings of held-out captions, and the CLIP score
        of the samples against their captions: the prior's own part of the stack's FID and CLIP score."""
        from train.online_eval import ClipSpaceEval

        ev = ClipSpaceEval(self.clip.embed_dim)
        for n, batch in enumerate(batches):
            image, text = self._encode(batch)
            gen = make_generator(self.ctx.seed * 7919 + self.ctx.rank * 101 + n, self.ctx.device)
            pred = model.sample(text.embedding, text.tokens, text.mask, steps=self.job.task.val_steps, generator=gen)
            ev.update(F.normalize(image.float(), dim=-1), pred, F.normalize(text.embedding.float(), dim=-1))
        return ev.compute()

    @torch.no_grad()
    def sample(self, model, batch) -> Grid | None:
        """With task.decoder: the prior's samples for held-out captions and task.sample_prompts, drawn
        by that decoder (one seed, so grids compare across steps)."""
        if self.decoder is None:
            return None
        captions = list(batch["caption"][: self.job.task.sample_count]) + self.prompts
        enc = self.clip.encode_captions(captions)
        steps = self.job.task.val_steps
        embed = model.sample(enc.embedding, enc.tokens, enc.mask, steps=steps, generator=make_generator(0))
        text = self.decoder.caption_inputs(captions, self.clip)
        gen = make_generator(1, self.ctx.device)
        images = self.decoder.sample(embed, steps=self.job.task.sample_steps, generator=gen, **text)
        held = len(captions) - len(self.prompts)
        labels = [f"held-out caption: {c}" for c in captions[:held]] + [f"your prompt: {c}" for c in self.prompts]
        return Grid(images, labels, columns=min(8, len(captions)))

    def export_config(self, model) -> dict[str, Any]:
        clip = asdict(self.clip_cfg)
        if clip["checkpoint"]:
            clip["checkpoint"] = str(Path(clip["checkpoint"]).resolve())
        return _unwrap(model).export_config() | {"clip": clip, "clip_fingerprint": self.fingerprint}

    def summary(self, metrics: dict[str, float]) -> str | None:
        if "val/cos_pred_image" not in metrics:
            return None
        pred, base = metrics["val/cos_pred_image"], metrics["val/cos_text_image_baseline"]
        closer = (1 - base) / max(1e-9, 1 - pred)
        return (
            f"held-out prior: cosine(sampled, true image embedding) {pred:.3f} vs baseline cosine(text, image) "
            f"{base:.3f} ({closer:.1f}x closer to the true image embedding than the caption's own); "
            f"an unrelated caption's image {metrics['val/cos_pred_unrelated_image']:.3f}"
        )


def train(job: PriorJob) -> int:
    return run(job, PriorTask(job))


@hydra.main(config_path="../conf", config_name="prior", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, PriorTask)


if __name__ == "__main__":
    check_overrides()
    main()
