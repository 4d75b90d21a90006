"""Image grids with captions: the synthetic set's contact sheet, training sample grids, eval reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(images: torch.Tensor | Sequence) -> list[Image.Image]:
    """(B, 3, H, W) tensors in [-1, 1] (float) or [0, 255] (uint8), or PIL images -> PIL images."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dtype != torch.uint8:
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
    return [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def captioned_grid(
    images, captions: Sequence[str] | None = None, columns: int = 8, cell: int = 128, caption_lines: int = 3
) -> Image.Image:
    """A grid of `images` scaled to `cell` pixels, each with its caption wrapped beneath it."""
    pils = to_pil(images)
    if not pils:
        raise ValueError("no images to put in a grid")
    columns = min(columns, len(pils))
    rows = math.ceil(len(pils) / columns)
    font = ImageFont.load_default()
    line_h = 12
    text_h = caption_lines * line_h + 4 if captions else 0
    sheet = Image.new("RGB", (columns * (cell + 4) + 4, rows * (cell + text_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(pils):
        x = 4 + (i % columns) * (cell + 4)
        y = 4 + (i // columns) * (cell + text_h + 4)
        sheet.paste(
            im.convert("RGB").resize(
                (cell, cell), Image.Resampling.NEAREST if im.width < cell else Image.Resampling.LANCZOS
            ),
            (x, y),
        )
        if captions:
            for j, line in enumerate(_wrap(draw, captions[i], font, cell)[:caption_lines]):
                draw.text((x, y + cell + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def save_grid(images, captions: Sequence[str], columns: int, path: Path) -> None:
    """A captioned grid at `path`, in cells of at least 128 px and never smaller than the images
    (upsampler detail stays visible); images larger than 128 px also one file each at full size, in
    a folder named like `path` without its suffix."""
    side = images.shape[-1]
    captioned_grid(images, captions, columns=columns, cell=max(128, side)).save(path)
    if side > 128:
        folder = path.with_suffix("")
        folder.mkdir(exist_ok=True)
        for i, image in enumerate(to_pil(images)):
            image.save(folder / f"{i:02d}.png")
