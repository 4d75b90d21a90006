"""Precompute CLIP image and text embeddings for a shard set, one output part per shard.

    python -m data.embed --shards datasets/synthetic/train --clip runs/demo-clip/export --out datasets/emb/train
    torchrun --nproc_per_node 8 -m data.embed --shards '/data/laion/{00000..09999}.tar' \\
        --clip ViT-L-14 --clip-checkpoint /models/ViT-L-14.pt --quick-gelu --out /data/laion-emb

Resumable: a shard whose part is complete is skipped, so a killed job reruns with the same command.
Under torchrun each rank takes every world_size-th shard. The output is clip-retrieval's layout
(data/embeddings.py), plus clip.json naming the CLIP (its fingerprint): the prior refuses
embeddings from another CLIP than its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from data.embeddings import INFO_FILE, part_complete, write_part
from data.loader import DataConfig, ShardLoader, list_shards
from unclip.clip import ClipConfig, ClipEncoder, build_clip


def clip_config_from_args(args: argparse.Namespace) -> ClipConfig:
    """--clip names an export folder, a YAML preset (conf/model/clip/*.yaml) or an open_clip arch."""
    spec = args.clip
    if Path(spec).is_dir():
        return ClipConfig(checkpoint=spec)
    if spec.endswith((".yaml", ".yml")):
        cfg = ClipConfig(**yaml.safe_load(Path(spec).read_text()))
    else:
        cfg = ClipConfig(arch=spec, pretrained=args.pretrained, quick_gelu=args.quick_gelu)
    if args.clip_checkpoint:
        cfg.checkpoint = args.clip_checkpoint
    cfg.allow_download = args.allow_download
    return cfg


# The CLIP's errors name the training entrypoints' Hydra keys; this command takes flags.
FLAGS = {
    "model.clip.checkpoint=": "--clip-checkpoint ",
    "model.clip.checkpoint": "--clip-checkpoint",
    "model.clip.allow_download=true": "--allow-download",
    "model.clip.arch=": "--clip ",
    "model.clip.model_cfg": "a --clip preset file's model_cfg",
}


def in_flag_terms(message: str) -> str:
    for key, flag in FLAGS.items():
        message = message.replace(key, flag)
    return message


@torch.no_grad()
def embed_shard(clip: ClipEncoder, url: str, batch_size: int, dtype: torch.dtype) -> dict:
    """Embeddings for every usable sample of one shard, in shard order."""
    device = clip.pixel_mean.device
    cfg = DataConfig(
        shards=url, resolution=clip.image_size[0], crop="center", resampled=False, shuffle_buffer=0, num_workers=0
    )
    loader = ShardLoader(cfg, batch_size=batch_size, repeat=False, shuffle=False, num_workers=0)
    keys, captions, img, txt = [], [], [], []
    try:
        for batch in loader:
            pixels = batch["image"].to(device).float() / 127.5 - 1
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                img.append(clip.encode_image(pixels).float().cpu().numpy())
                txt.append(clip.encode_captions(batch["caption"]).embedding.float().cpu().numpy())
            keys += batch["key"]
            captions += batch["caption"]
    except ValueError as e:  # a shard with no usable sample: an empty part, counted
        print(f"warning: {url}: {e}", file=sys.stderr)
    dim = clip.embed_dim
    return {
        "keys": keys,
        "captions": captions,
        "skipped": loader.skipped,
        "img": np.concatenate(img) if img else np.zeros((0, dim), np.float32),
        "txt": np.concatenate(txt) if txt else np.zeros((0, dim), np.float32),
    }


def write_info(out: Path, clip: ClipEncoder, cfg: ClipConfig) -> None:
    info = clip.describe() | {"fingerprint": clip.fingerprint(), "config": asdict(cfg)}
    path = out / INFO_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != info["fingerprint"]:
            raise ValueError(
                f"{out} holds embeddings of another CLIP (fingerprint {old.get('fingerprint')}, "
                f"this one {info['fingerprint']}): use a new --out"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def embed_shards(
    shards: str,
    clip: ClipEncoder,
    cfg: ClipConfig,
    out: Path,
    *,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Counter:
    """Embed this rank's share of the shards into `out`; returns the skipped-sample counts."""
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_info(out, clip, cfg)
    urls = list_shards(shards)
    mine = urls[rank::world_size]
    skipped: Counter = Counter()
    for url in tqdm(mine, desc=f"embed rank {rank}", unit="shard", disable=not progress):
        part = Path(url).name.split(".")[0]
        if part_complete(out, part):
            continue
        res = embed_shard(clip, url, batch_size, dtype)
        skipped.update(res["skipped"])
        write_part(
            out, part, res["keys"], res["captions"], res["img"].astype(np.float16), res["txt"].astype(np.float16)
        )
    return skipped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="folder, brace pattern or list of shards")
    p.add_argument("--out", required=True, help="output folder (img_emb/, text_emb/, metadata/, clip.json)")
    p.add_argument(
        "--clip",
        required=True,
        help="a train.clip export folder, a conf/model/clip/*.yaml, or an open_clip arch name such as ViT-L-14",
    )
    p.add_argument("--clip-checkpoint", help="local weights for --clip (a file)")
    p.add_argument("--pretrained", help="open_clip pretrained tag (a download; needs --allow-download)")
    p.add_argument("--quick-gelu", action="store_true", help="QuickGELU, as OpenAI's weights need")
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision for the CLIP forward (auto: bf16 on GPU, fp32 on CPU)",
    )
    args = p.parse_args(argv)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    name = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    try:
        cfg = clip_config_from_args(args)
        clip = build_clip(cfg, device)
        skipped = embed_shards(
            args.shards, clip, cfg, Path(args.out), batch_size=args.batch_size, rank=rank, world_size=world, dtype=dtype
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {in_flag_terms(str(e))}")
    print(f"rank {rank}: embeddings in {args.out}" + (f"; skipped {dict(skipped)}" if skipped else ""))


if __name__ == "__main__":
    main()
