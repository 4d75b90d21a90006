"""Provenance of generated images: what made them, in the PNG itself, and a watermark (DALL-E 2 shipped both).

Every PNG carries two text chunks:
- `parameters`, the convention image tools already read (AUTOMATIC1111, InvokeAI, civitai): the prompt
  on the first line, `Negative prompt: ...` on the second when there is one, then `Steps: ...,
  Sampler: ..., CFG scale: ..., Seed: ..., Size: ..., Model hash: ..., Model: ...` for the decoder,
  and the prior's and upsamplers' settings as further keys;
- `unclip`, a JSON record: program and version, mode, prompt, seed, every stage's settings, every
  export's path, run, step and weights hash, the CLIP's fingerprint.

An invisible DWT-DCT-SVD watermark (the `invisible-watermark` package, `pip install unclip[watermark]`)
is added where that package is installed and the image is at least 256 px on its shorter side (the
method needs room), and checked by reading it back; `inspect` reports whether one is present. A
visible signature (DALL-E 2's five colored squares in the bottom-right corner) is an option.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

PROGRAM = "unclip"
WATERMARK = b"unclip"  # 48 bits
WATERMARK_MIN_SIDE = 256
WATERMARK_METHOD = "dwtDctSvd"  # DWT-DCT with SVD: reads back from flat synthetic scenes, where plain dwtDct fails
SIGNATURE_COLORS = ((255, 255, 102), (66, 255, 255), (81, 218, 76), (255, 110, 60), (60, 70, 255))


def version() -> str:
    try:
        return metadata.version(PROGRAM)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" where absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the record ---------------------------------------------------------------------------------------
def image_record(settings: dict[str, Any], record: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The JSON provenance of one image: the call's settings plus the image's own record."""
    return {"program": PROGRAM, "version": version(), "size": list(size)} | settings | record


def parameters_text(rec: dict[str, Any]) -> str:
    """The `parameters` chunk in the AUTOMATIC1111 layout (prompt line, then `Key: value, ...`)."""
    stages = rec.get("stages", {})
    decoder = stages.get("decoder", {})
    exports = rec.get("exports", {})
    dec_export = exports.get("decoder", {})
    prompt = rec.get("prompt") or f"({rec.get('mode', 'generation')} without a prompt)"
    fields = {
        "Steps": decoder.get("steps"),
        "Sampler": decoder.get("sampler"),
        "CFG scale": decoder.get("guidance"),
        "Seed": rec.get("seed"),
        "Size": "x".join(str(v) for v in rec.get("size", [])),
        "Model hash": (dec_export.get("sha256") or "")[:10],
        "Model": dec_export.get("run"),
        "Mode": rec.get("mode"),
    }
    if "prior" in stages:
        p = stages["prior"]
        fields |= {"Prior steps": p["steps"], "Prior guidance": p["guidance"], "Prior candidates": p["candidates"]}
    for name in ("up256", "up1024"):
        if name in stages:
            fields |= {f"{name} steps": stages[name]["steps"], f"{name} sampler": stages[name]["sampler"]}
    fields["Version"] = f"{PROGRAM} {rec.get('version', version())}"
    line = ", ".join(f"{k}: {v}" for k, v in fields.items() if v not in (None, ""))
    negative = rec.get("negative_prompt")
    return f"{prompt}\nNegative prompt: {negative}\n{line}" if negative else f"{prompt}\n{line}"


def png_bytes(
    image: Image.Image,
    record: dict[str, Any],
    *,
    watermark: bool = True,
    signature: bool = False,
    keep: np.ndarray | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """(the PNG of `image` with its provenance chunks and marks, what was marked). `keep` (H, W) bool:
    the pixels an edit kept from its input, which stay exactly as they are; the marks go on the rest."""
    marks = {"watermark": "off", "signature": bool(signature)}
    unmarked = image
    if watermark:
        image, marks["watermark"] = add_watermark(image)
    if signature:  # after the watermark, so the signature's colors stay exact
        image = add_signature(image)
    if keep is not None and image is not unmarked:
        image = Image.fromarray(np.where(keep[:, :, None], np.asarray(unmarked.convert("RGB")), np.asarray(image)))
        if marks["watermark"] == WATERMARK_METHOD and detect_watermark(image) != "present":
            marks["watermark"] = "not kept (the edit repainted too little of the image to carry it)"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(record))
    info.add_text(PROGRAM, json.dumps(record | {"marks": marks}, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue(), marks


def save_png(
    image: Image.Image, path: str | os.PathLike, record: dict[str, Any], *, watermark=True, signature=False, keep=None
):
    """Write `image` to `path` atomically with its provenance; returns what was marked (see png_bytes)."""
    data, marks = png_bytes(image, record, watermark=watermark, signature=signature, keep=keep)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return marks


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """{"parameters": str | None, "record": dict | None, "watermark": "present" | "absent" | why not}."""
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            pixels = im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image: {e}") from None
    record = None
    if PROGRAM in text:
        try:
            record = json.loads(text[PROGRAM])
        except json.JSONDecodeError:
            record = {"error": "the unclip chunk is not valid JSON"}
    return {"parameters": text.get("parameters"), "record": record, "watermark": detect_watermark(pixels)}


# --- marks --------------------------------------------------------------------------------------------
def _watermark_module():
    try:
        import imwatermark  # the invisible-watermark package
    except ImportError:
        return None
    return imwatermark


def add_watermark(image: Image.Image) -> tuple[Image.Image, str]:
    """(image, what happened): the method's name when marked (and read back), else why not."""
    module = _watermark_module()
    if module is None:
        return image, "not installed (pip install unclip[watermark])"
    if min(image.size) < WATERMARK_MIN_SIDE:
        return image, f"image under {WATERMARK_MIN_SIDE}px"
    encoder = module.WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    bgr = _bgr(image)
    marked = encoder.encode(bgr, WATERMARK_METHOD)
    # invisible-watermark casts to uint8 without clipping, so a saturated pixel can wrap around
    # (255 -> ~0): keep the original wherever the change is far larger than the mark's own
    marked = np.where(np.abs(marked.astype(np.int16) - bgr) > 48, bgr, marked).astype(np.uint8)
    if _read_mark(module, marked) != WATERMARK:
        return image, "not embedded (the image is too flat to carry it)"
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1])), WATERMARK_METHOD


def detect_watermark(image: Image.Image) -> str:
    module = _watermark_module()
    if module is None:
        return "unknown (invisible-watermark not installed)"
    if min(image.size) < WATERMARK_MIN_SIDE:
        return f"none possible (under {WATERMARK_MIN_SIDE}px)"
    return "present" if _read_mark(module, _bgr(image)) == WATERMARK else "absent"


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def _read_mark(module, bgr: np.ndarray) -> bytes:
    return module.WatermarkDecoder("bytes", 8 * len(WATERMARK)).decode(bgr, WATERMARK_METHOD)


def add_signature(image: Image.Image) -> Image.Image:
    """DALL-E 2's visible signature: five colored squares along the bottom-right edge."""
    out = image.convert("RGB").copy()
    side = max(2, round(min(out.size) / 64))
    arr = np.asarray(out).copy()
    h, w = arr.shape[:2]
    for k, color in enumerate(reversed(SIGNATURE_COLORS)):
        right = w - k * side
        arr[h - side : h, max(0, right - side) : right] = color
    return Image.fromarray(arr)
