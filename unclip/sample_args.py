"""The command line of python -m unclip.sample: one sub-command per mode, each with its own flags only.

Every sampling flag is a SampleSettings field (--decoder-guidance is decoder_guidance), so the command
line and the Python API cannot drift apart; a sub-command lists the settings its mode reads.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from unclip.safety import DEFAULT_BLOCKLIST

MODES = ("text", "variations", "interpolate", "text-diff", "inpaint", "outpaint")
# the SampleSettings fields each mode reads
_STAGES = ("seed", "batch_size", "decoder_steps", "decoder_sampler", "decoder_eta", "decoder_guidance", "up256_steps",
           "up256_sampler", "up256_eta", "up1024_steps", "up1024_sampler", "up1024_eta", "stop_at")  # fmt: skip
_PRIOR = ("prior_steps", "prior_guidance", "prior_candidates", "negative_prompt")
_EMBEDDING = ("start", "image_fit")
_EDIT = ("jump_length", "jump_n_sample", "feather", "image_fit")
SETTINGS_OF = {
    "text": _STAGES + _PRIOR + ("rerank",),
    "variations": _STAGES + _EMBEDDING + ("negative_prompt",),
    "interpolate": _STAGES + _EMBEDDING,
    "text-diff": _STAGES + _EMBEDDING,
    "inpaint": _STAGES + _PRIOR + _EDIT,
    "outpaint": _STAGES + _PRIOR + _EDIT,
}


class OneLineErrors(argparse.ArgumentParser):
    """A parser whose errors are one line (argparse's own repeat the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


STACK_PARTS = ("prior", "decoder", "up256", "up1024", "clip")


def stack_arguments(parser: argparse.ArgumentParser) -> None:
    """--stack and one flag per export (unclip.sample.stack_paths reads them); the server takes them too."""
    stack = parser.add_argument_group("the stack (export folders, runs/<name>/export)")
    stack.add_argument("--stack", help="a runs folder (runs/) or a run-name prefix (runs/demo -> runs/demo-*)")
    for name in STACK_PARTS:
        stack.add_argument(f"--{name}", help=f"the {name} export (overrides --stack)")


def common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    stack_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="samples", help="output folder (default: samples/)")
    out.add_argument("--no-watermark", action="store_true", help="skip the invisible watermark")
    out.add_argument("--signature", action="store_true", help="add DALL-E 2's visible color-bar signature")
    run = parser.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when there is a GPU)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    safety = parser.add_argument_group("prompt filter")
    safety.add_argument("--blocklist", default=str(DEFAULT_BLOCKLIST), help="words and re: patterns to refuse")
    safety.add_argument("--no-prompt-filter", action="store_true", help="turn the blocklist off")
    safety.add_argument("--prompt-classifier", action="append", default=[], help="module:function, repeatable")
    settings_arguments(parser.add_argument_group("sampling (default: each export's own setting)"), SETTINGS_OF[mode])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m unclip.sample", description="Generate images from a trained unCLIP stack.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + ",inspect}")

    def mode(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        common_arguments(p, name)
        return p

    p = mode("text", "text-to-image through the whole stack")
    p.add_argument("prompts", nargs="*", help="captions (or --prompts FILE)")
    p.add_argument("--prompts", dest="prompt_file", help="a file with one caption per line")
    p.add_argument("--num-images", type=at_least(1), default=4, help="images per prompt (default 4)")
    p = mode("variations", "new images from an image's CLIP embedding and its inverted latent")
    p.add_argument("image", help="the image to make variations of")
    p.add_argument("--num-images", type=at_least(1), default=4, help="variations of the image (default 4)")
    p.add_argument("--prompt", help="also condition the decoder on a caption")
    p = mode("interpolate", "frames between two images' embeddings and latents")
    p.add_argument("image_a", help="the first frame's image")
    p.add_argument("image_b", help="the last frame's image")
    p.add_argument("--frames", type=at_least(2), default=5, help="frames, both ends included (default 5)")
    p = mode("text-diff", "move an image along a caption change")
    p.add_argument("image", help="the image to change (the first frame)")
    p.add_argument("--from", dest="from_caption", required=True, help="what the image shows now")
    p.add_argument("--to", dest="to_caption", required=True, help="what it should show")
    p.add_argument("--frames", type=at_least(2), default=5, help="frames, the input's first (default 5)")
    p.add_argument("--max-angle", type=fraction(), default=0.5, help="the last frame's slerp angle (0..1)")
    p = mode("inpaint", "repaint a region of an image")
    p.add_argument("image", help="the image to edit")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="white (or transparent) = paint, black = keep; the image's size")
    where.add_argument("--box", help="the region to paint: left,top,right,bottom in pixels")
    p.add_argument("--prompt", help="what to paint (without one: the image's own embedding)")
    p.add_argument("--num-images", type=at_least(1), default=1, help="images to make (default 1)")
    p = mode("outpaint", "extend the canvas around an image")
    p.add_argument("image", help="the image to extend")
    grow = p.add_mutually_exclusive_group(required=True)
    grow.add_argument("--extend", help="pixels to add: left,right,top,bottom")
    grow.add_argument("--aspect", help="grow to this aspect ratio (16:9, 1.5)")
    p.add_argument("--prompt", help="what the new region shows (without one: the image's embedding)")
    p.add_argument("--num-images", type=at_least(1), default=1, help="images to make (default 1)")
    p.add_argument("--overlap", type=fraction(high_open=True), default=0.5, help="fraction of a tile over what exists")
    p = sub.add_parser("inspect", help="print the provenance of generated PNGs")
    p.add_argument("files", nargs="+", help="PNGs made by unclip (or any PNG: says what it finds)")
    p.add_argument("--json", action="store_true", help="the JSON records only")
    return parser


def settings_arguments(group, names: tuple[str, ...]) -> None:
    """One flag per SampleSettings field the mode reads (--decoder-guidance, --up256-steps, ...)."""
    from unclip.settings import SampleSettings

    for f in fields(SampleSettings):
        if f.name not in names:
            continue
        kind = typed(int) if f.type.startswith("int") else typed(float) if f.type.startswith("float") else str
        group.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f.metadata["help"])


def at_least(low: int):
    """An argparse type: an integer >= low, with the flag named by argparse when it is not."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def fraction(high_open: bool = False):
    """An argparse type: a finite number in [0, 1] (or [0, 1))."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0 <= value < 1 if high_open else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"must be in [0, 1{')' if high_open else ']'}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def typed(kind):
    """int / float for argparse, saying "not a number" rather than Python's "invalid literal"."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    parse.__name__ = kind.__name__
    return parse
