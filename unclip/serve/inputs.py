"""What a request may ask for, checked before it reaches the queue: sizes the stack serves, counts,
prompts, uploaded PNGs and masks (sizes read from the header before anything is decoded), and the
sampling extensions (every SampleSettings knob, as the command line has them: seed, steps and
guidance per stage, negative prompt). Each failure is an APIError naming the parameter."""

from __future__ import annotations

import io
from dataclasses import fields
from typing import Any

from PIL import Image

from unclip.images import ImageTooLarge, open_checked
from unclip.serve.errors import bad_request, too_large
from unclip.settings import SampleSettings

PROMPT_LIMIT = 1000  # characters: DALL-E 2's limit in OpenAI's API
MAX_IMAGES = 10  # n: 1-10, as OpenAI's API
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SampleSettings knobs a request may set; the server owns the batch, and the size sets stop_at
SERVER_OWNED = ("batch_size", "stop_at")
EXTENSIONS = tuple(f.name for f in fields(SampleSettings) if f.name not in SERVER_OWNED)


def served_sizes(pipe) -> list[int]:
    """The sizes the loaded stack makes: the decoder's, then each upsampler's in the chain."""
    sizes = [pipe.decoder.image_size]
    for name in ("up256", "up1024"):
        if name in pipe.upsamplers:
            sizes.append(pipe.upsamplers[name].cfg.target_size)
    return sizes


def parse_size(value: Any, sizes: list[int]) -> int:
    """'256x256' -> 256, if the stack makes it; the largest size when none is asked for."""
    if value in (None, ""):
        return sizes[-1]
    served = ", ".join(f"{s}x{s}" for s in sizes)
    text = str(value).lower().strip()
    w, _, h = text.partition("x")
    if not (w.isdigit() and h.isdigit()) or w != h or int(w) not in sizes:
        raise bad_request(f"'{value}' is not a size this stack makes; it makes {served}", "size")
    return int(w)


def parse_n(value: Any) -> int:
    if value in (None, ""):
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise bad_request(f"n must be an integer from 1 to {MAX_IMAGES}, got {value!r}", "n") from None
    if not 1 <= n <= MAX_IMAGES:
        raise bad_request(f"n must be from 1 to {MAX_IMAGES}, got {n}", "n")
    return n


def parse_response_format(value: Any) -> str:
    if value in (None, ""):
        return "url"
    if value not in ("url", "b64_json"):
        raise bad_request(f"response_format must be 'url' or 'b64_json', got {value!r}", "response_format")
    return str(value)


def parse_prompt(value: Any, required: bool) -> str | None:
    if value in (None, ""):
        if required:
            raise bad_request("a prompt is required", "prompt")
        return None
    if not isinstance(value, str):
        raise bad_request("prompt must be a string", "prompt")
    if len(value) > PROMPT_LIMIT:
        raise bad_request(f"prompt is {len(value)} characters; the limit is {PROMPT_LIMIT}", "prompt")
    return value


def sample_settings(body: dict[str, Any]) -> SampleSettings:
    """The sampling extensions a request carries (JSON values, or form fields as text), checked as the
    command line checks them; absent ones take the exports' own values."""
    given: dict[str, Any] = {}
    for f in fields(SampleSettings):
        value = body.get(f.name)
        if value in (None, ""):
            continue
        if f.name in SERVER_OWNED:
            raise bad_request(f"{f.name} is set by the server (the size sets the last stage)", f.name)
        given[f.name] = _typed(value, str(f.type), f.name)
    settings = SampleSettings(**given)
    try:
        settings.validate()
    except ValueError as e:
        field = next((name for name in EXTENSIONS if str(e).startswith(name)), None)
        raise bad_request(str(e), field) from None
    return settings


def _typed(value: Any, hint: str, name: str) -> Any:
    kind = int if hint.startswith("int") else float if hint.startswith("float") else str
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    try:
        number = float(value) if kind is float else int(str(value))
    except ValueError:
        raise bad_request(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}", name
        ) from None
    return number


# --- uploads ---------------------------------------------------------------------------------------
def read_png(data: bytes, param: str, max_bytes: int) -> Image.Image:
    """An uploaded PNG, checked before it is decoded: under the byte limit, a PNG, at most
    MAX_INPUT_PIXELS by its header (a decompression bomb is a 413, never decoded), square."""
    if len(data) > max_bytes:
        raise too_large(f"{param} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB", param)
    if not data.startswith(PNG_SIGNATURE):
        raise bad_request(f"{param} must be a PNG file", param)

    def square(image: Image.Image) -> None:
        if image.width != image.height:
            raise bad_request(f"{param} must be square, got {image.width}x{image.height}", param)

    try:
        return open_checked(io.BytesIO(data), param, check_header=square)
    except ImageTooLarge as e:
        raise too_large(str(e), param) from None
    except ValueError as e:
        raise bad_request(str(e), param) from None


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The mask of an edit, OpenAI's way: transparent pixels mark what to repaint, in the mask or,
    without one, in the image itself (outpainting: the image with a transparent border around it)."""
    if mask is None:
        if not has_alpha(image) or image.convert("RGBA").getchannel("A").getextrema()[0] == 255:
            raise bad_request(
                "without a mask, the image's transparent pixels mark what to edit, and this image has none: "
                "send a mask, or an image with a transparent region",
                "image",
            )
        return image.convert("RGBA")
    if mask.size != image.size:
        raise bad_request(
            f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}", "mask"
        )
    if not has_alpha(mask):
        raise bad_request("the mask must have an alpha channel: its transparent pixels mark what to repaint", "mask")
    if mask.convert("RGBA").getchannel("A").getextrema()[0] == 255:
        raise bad_request("the mask has no transparent pixels: nothing to repaint", "mask")
    return mask.convert("RGBA")
