"""python -m train.upsampler: 64->256 (stage=up256) and 256->1024 (stage=up1024).

    python -m train.upsampler experiment=demo_upsampler                 # what make demo runs
    torchrun --standalone --nproc_per_node 8 -m train.upsampler stage=up256 model/upsampler=paper256 \\
        data=webdataset data.shards='/data/laion/{00000..09999}.tar' distributed=zero2 precision=bf16
    torchrun ... -m train.upsampler stage=up1024 model/upsampler=paper1024 data=webdataset data.shards=...

The data is read at the target resolution; each step takes a random crop of a quarter of the side,
makes its low-resolution version (degraded: blur for up256, BSR for up1024), upsamples it back and
trains the U-Net to denoise the crop given it. Sample grids upsample whole held-out images.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from train.cli import check_overrides
from train.conditioning import pixels
from train.config import UpsamplerJob
from train.run import main as run_main
from train.run import run
from train.task import Grid, Task, TaskContext
from unclip.degrade import make_low_res, upsample
from unclip.diffusion import make_generator
from unclip.upsampler import Upsampler


def _unwrap(model):
    return getattr(model, "module", model)


def random_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """One random (size x size) crop per image (positions from the global RNG: restored on resume)."""
    b, _, h, w = images.shape
    tops = torch.randint(0, h - size + 1, (b,)).tolist()
    lefts = torch.randint(0, w - size + 1, (b,)).tolist()
    return torch.stack([img[:, t : t + size, s : s + size] for img, t, s in zip(images, tops, lefts)])


class UpsamplerTask(Task):
    kind = "upsampler"

    def __init__(self, job: UpsamplerJob):
        self.job = job
        self.cfg = job.model.upsampler

    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        self.cfg.validate()
        if self.job.data.resolution != self.cfg.target_size:
            raise ValueError(
                f"data.resolution={self.job.data.resolution} but this upsampler makes "
                f"{self.cfg.target_size}px images: set data.resolution={self.cfg.target_size}"
            )

    def build_model(self) -> Upsampler:
        return Upsampler(self.cfg)

    def conditioning(self, crops: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(low-resolution conditioning brought back to the crop size, augmentation levels or None)."""
        cfg = self.cfg
        low = make_low_res(crops, cfg.scale, cfg.degradation, train=train)
        cond = upsample(low, crops.shape[-2:])
        if cfg.noise_aug_max <= 0:
            return cond, None
        levels = (
            torch.rand(len(crops), device=crops.device) * cfg.noise_aug_max
            if train
            else torch.full((len(crops),), cfg.noise_aug_sample, device=crops.device)
        )
        return cond + levels[:, None, None, None] * torch.randn_like(cond), levels

    def loss(self, model, batch):
        up: Upsampler = _unwrap(model)
        x0 = random_crops(pixels(batch, self.ctx.device), self.cfg.crop_size)
        cond, levels = self.conditioning(x0)
        diffusion = up.diffusion
        i = diffusion.training_timesteps(len(x0), x0.device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, i, noise)
        out = model(x_t, diffusion.model_timesteps(i), cond, levels)
        loss, terms = diffusion.training_loss(out, x0, x_t, noise, i)
        return loss.mean(), {f"upsampler/{k}": v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, model, batches) -> dict[str, float]:
        """Held-out loss on center crops with clean conditioning, at fixed noise levels and noise."""
        up: Upsampler = model
        gen = make_generator(self.ctx.seed * 31 + self.ctx.rank, self.ctx.device)
        total = 0.0
        for batch in batches:
            full = pixels(batch, self.ctx.device)
            c, (h, w) = self.cfg.crop_size, full.shape[-2:]
            x0 = full[:, :, (h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
            cond, levels = self.conditioning(x0, train=False)
            i = torch.randint(0, up.diffusion.num_steps, (len(x0),), generator=gen, device=x0.device)
            noise = torch.randn(x0.shape, generator=gen, device=x0.device)
            x_t = up.diffusion.q_sample(x0, i, noise)
            _, terms = up.diffusion.training_loss(
                up(x_t, up.diffusion.model_timesteps(i), cond, levels), x0, x_t, noise, i
            )
            total += terms["mse"].mean().item() / len(batches)
        return {"mse": total}

    @torch.no_grad()
    def sample(self, model, batch) -> Grid:
        """Rows: the low-resolution input (nearest-neighbour enlarged), the upsampled sample, the real image."""
        up: Upsampler = model
        n = min(self.job.task.sample_count, len(batch["caption"]))
        truth = pixels({"image": batch["image"][:n]}, self.ctx.device)
        low = make_low_res(truth, self.cfg.scale, self.cfg.degradation, train=False)
        out = up.sample(low, steps=self.job.task.sample_steps, generator=make_generator(0, self.ctx.device))
        shown = F.interpolate(low, size=truth.shape[-2:], mode="nearest")
        labels = [f"input {low.shape[-1]}px"] * n + [f"upsampled {out.shape[-1]}px"] * n + ["real"] * n
        return Grid(torch.cat([shown, out, truth]), labels, columns=n)

    def export_config(self, model) -> dict[str, Any]:
        return _unwrap(model).export_config()

    def summary(self, metrics: dict[str, float]) -> str | None:
        if "val/mse" not in metrics:
            return None
        return f"held-out upsampler loss: mse {metrics['val/mse']:.4f}; sample grids in {self.job.run_dir / 'samples'}"


def train(job: UpsamplerJob) -> int:
    return run(job, UpsamplerTask(job))


@hydra.main(config_path="../conf", config_name="upsampler", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, UpsamplerTask)


if __name__ == "__main__":
    check_overrides()
    main()
