"""The pipeline calls behind each endpoint, as the worker thread runs them: one batch of jobs in,
one list of images out per job, each image a PNG with its provenance (the chunks the command line
writes) and its seed."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from PIL import Image

from unclip.provenance import image_record, png_bytes


def run_batch(pipe, batch: list) -> list[list[dict[str, Any]]]:
    first = batch[0]
    if first.kind == "generation":
        return _generations(pipe, batch)
    return [_edit(pipe, first) if first.kind == "edit" else _variations(pipe, first)]


def _generations(pipe, batch: list) -> list[list[dict[str, Any]]]:
    """Every job's prompt in one text_to_image call, each job with its own seed."""
    n = batch[0].args["n"]
    gen = pipe.text_to_image(
        [job.args["prompt"] for job in batch],
        num_images=n,
        settings=batch[0].settings,
        seeds=[j.settings.seed for j in batch],
    )
    images = _pngs(pipe, gen, batch[0].args)
    return [images[k * n : (k + 1) * n] for k in range(len(batch))]


def _edit(pipe, job) -> list[dict[str, Any]]:
    """Inpainting, or outpainting when the transparent region is a border around the image: either way
    the transparent pixels are repainted and the rest kept."""
    a = job.args
    gen = pipe.inpaint(a["image"], a["mask"], prompt=a["prompt"], num_images=a["n"], settings=job.settings)
    return _pngs(pipe, gen, a)


def _variations(pipe, job) -> list[dict[str, Any]]:
    a = job.args
    gen = pipe.variations(a["image"], a["n"], prompt=a.get("prompt"), settings=job.settings)
    return _pngs(pipe, gen, a)


def _pngs(pipe, gen, args: dict[str, Any]) -> list[dict[str, Any]]:
    out, size = [], args["size"]
    keep = gen.keep
    for image, rec in zip(gen.images, gen.records):
        if image.size != (size, size):  # an edit comes back at its input's size: then it keeps nothing exactly
            image, keep = image.resize((size, size), Image.Resampling.LANCZOS), None
        record = image_record(gen.settings | {"user": args.get("user")}, rec, image.size)
        data, _ = png_bytes(image, record, watermark=args.get("watermark", True), keep=keep)
        out.append({"png": data, "seed": rec["seed"], "notes": gen.notes})
    return out


def with_size(settings, size: int, batch_images: int):
    """The request's settings with the last stage set by its size and the server's batch."""
    return replace(settings, stop_at=size, batch_size=batch_images)
