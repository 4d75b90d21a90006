"""python -m train.clip: contrastive training of an open_clip model on image-caption shards.

    python -m train.clip                                       # the tiny CLIP on the synthetic set
    python -m train.clip experiment=demo_clip                  # what make demo runs
    torchrun --nproc_per_node 8 -m train.clip model/clip=ViT-L-14 model.clip.checkpoint=/m/ViT-L-14.pt \\
        data=webdataset data.shards='/data/domain/{00000..00099}.tar' distributed=zero2

It is how the embedded default gets a CLIP that aligns the synthetic captions and images, and how
a user adapts CLIP to a new domain. The export (runs/<name>/export) loads as model.clip.checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from open_clip.loss import ClipLoss

from train.cli import check_overrides
from train.config import ClipJob
from train.run import main as run_main
from train.run import run
from train.task import Task, TaskContext
from unclip.clip import ClipEncoder, build_clip


class ClipTask(Task):
    kind = "clip"

    def __init__(self, job: ClipJob):
        self.clip_cfg = replace(job.model.clip, frozen=False)
        self.task_cfg = job.task

    def build_model(self) -> ClipEncoder:
        model = build_clip(self.clip_cfg)
        if self.clip_cfg.checkpoint is None and self.clip_cfg.pretrained is None:
            with torch.no_grad():
                model.model.logit_scale.fill_(self.task_cfg.logit_scale_init)
        # DeepSpeed broadcasts parameters as bytes and cannot view a 0-dim one: make the scale 1-d.
        model.model.logit_scale = torch.nn.Parameter(model.model.logit_scale.detach().reshape(1))
        self.tokenizer = model.tokenizer
        return model

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch["image"].to(self.ctx.device, non_blocking=True).float() / 127.5 - 1
        tokens = self.tokenizer(batch["caption"]).to(self.ctx.device)
        return pixels.to(self.ctx.dtype), tokens

    def setup(self, ctx: TaskContext) -> None:
        super().setup(ctx)
        # open_clip's loss as open_clip trains at scale: every rank's images and captions are contrasted
        # with the whole global micro-batch (features gathered with their gradients), each rank scoring
        # its own rows. Averaged over ranks, that is the loss of one big batch.
        self.criterion = ClipLoss(local_loss=True, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)

    def loss(self, model, batch):
        image, text, scale = model(*self._inputs(batch))
        per_image, per_text = self.criterion.get_logits(image.float(), text.float(), scale.float())
        labels = self.criterion.get_ground_truth(per_image.device, per_image.shape[0])  # this rank's rows
        loss = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        acc = (per_image.argmax(dim=1) == labels).float().mean()
        return loss, {"clip/batch_acc_i2t": acc, "clip/logit_scale": scale.detach().float()}

    @torch.no_grad()
    def validate(self, model, batches) -> dict[str, float]:
        """Top-1 retrieval over this rank's held-out gallery. A hit is a retrieved caption (or image)
        whose caption equals the query's: synthetic captions repeat, and any matching one is right."""
        images, texts, captions = [], [], []
        for batch in batches:
            image, text, _ = model(*self._inputs(batch))
            images.append(image.float())
            texts.append(text.float())
            captions += batch["caption"]
        sim = torch.cat(images) @ torch.cat(texts).T  # (N images, N captions)
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        label = torch.tensor([ids[c] for c in captions], device=sim.device)
        same = label[:, None] == label[None, :]
        i2t = same[torch.arange(len(label)), sim.argmax(dim=1)].float().mean()
        t2i = same[sim.argmax(dim=0), torch.arange(len(label))].float().mean()
        chance = same.float().mean()
        return {
            "retrieval_i2t": i2t.item(),
            "retrieval_t2i": t2i.item(),
            "retrieval_chance": chance.item(),
            "gallery": float(len(label)),
        }

    def export_config(self, model: ClipEncoder) -> dict[str, Any]:
        return model.export_config()

    def export_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # ClipEncoder keeps open_clip's model under .model; the export holds open_clip's own names
        # and shapes (a 0-dim logit scale).
        out = {k.removeprefix("model."): v for k, v in state.items()}
        out["logit_scale"] = out["logit_scale"].reshape(())
        return out

    def import_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in weights.items()}  # the logit scale's shape is restored on load

    def summary(self, metrics: dict[str, float]) -> str | None:
        if "val/retrieval_i2t" not in metrics:
            return None
        return (
            f"held-out retrieval top-1 over {int(metrics['val/gallery'])} pairs per rank: image->text "
            f"{metrics['val/retrieval_i2t']:.1%}, text->image {metrics['val/retrieval_t2i']:.1%} "
            f"(chance {metrics['val/retrieval_chance']:.1%})"
        )


def train(job: ClipJob) -> int:
    return run(job, ClipTask(job))


@hydra.main(config_path="../conf", config_name="clip", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_main(cfg, ClipTask)


if __name__ == "__main__":
    check_overrides()
    main()
