"""python -m unclip.sample: generate from a trained stack on the command line.

    python -m unclip.sample text "a big red star on a blue background" --stack runs/demo --out samples/
    python -m unclip.sample text --prompts captions.txt --num-images 4 --stack runs/ --decoder-guidance 3
    python -m unclip.sample variations photo.png --stack runs/demo
    python -m unclip.sample interpolate a.png b.png --frames 7 --stack runs/demo
    python -m unclip.sample text-diff photo.png --from "a photo of a cat" --to "a photo of a dog" --stack runs/demo
    python -m unclip.sample inpaint photo.png --mask mask.png --prompt "a red circle" --stack runs/demo
    python -m unclip.sample outpaint photo.png --aspect 16:9 --stack runs/demo
    python -m unclip.sample inspect samples/00000-a-big-red-star/00.png
    torchrun --nproc_per_node 8 -m unclip.sample text --prompts captions.txt --stack runs/ --out samples/

Under torchrun the prompts are dealt out by RANK and WORLD_SIZE (no process group): each rank writes
its own prompts' files. A rerun skips the images already written, so an interrupted run resumes.
Prompts are checked by the prompt filter before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from unclip.safety import DEFAULT_BLOCKLIST, PromptFilter, load_classifier

# pipeline, provenance and torch load lazily: refusals and --help come before any model does
MODES = ("text", "variations", "interpolate", "text-diff", "inpaint", "outpaint")


# --- the command line ----------------------------------------------------------------------------------
class OneLineErrors(argparse.ArgumentParser):
    """A parser whose errors are one line (argparse's own repeat the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    stack = common.add_argument_group("the stack (export folders, runs/<name>/export)")
    stack.add_argument("--stack", help="a runs folder (runs/) or a run-name prefix (runs/demo -> runs/demo-*)")
    for name in ("prior", "decoder", "up256", "up1024", "clip"):
        stack.add_argument(f"--{name}", help=f"the {name} export (overrides --stack)")
    out = common.add_argument_group("output")
    out.add_argument("--out", default="samples", help="output folder (default: samples/)")
    out.add_argument("--no-watermark", action="store_true", help="skip the invisible watermark")
    out.add_argument("--signature", action="store_true", help="add DALL-E 2's visible color-bar signature")
    run = common.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when there is a GPU)")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    safety = common.add_argument_group("prompt filter")
    safety.add_argument("--blocklist", default=str(DEFAULT_BLOCKLIST), help="words and re: patterns to refuse")
    safety.add_argument("--no-prompt-filter", action="store_true", help="turn the blocklist off")
    safety.add_argument("--prompt-classifier", action="append", default=[], help="module:function, repeatable")
    _settings_arguments(common.add_argument_group("sampling (default: each export's own setting)"))

    parser = OneLineErrors(prog="python -m unclip.sample", description="Generate images from a trained unCLIP stack.")
    sub = parser.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + ",inspect}")
    p = sub.add_parser("text", parents=[common], help="text-to-image through the whole stack")
    p.add_argument("prompts", nargs="*", help="captions (or --prompts FILE)")
    p.add_argument("--prompts", dest="prompt_file", help="a file with one caption per line")
    p.add_argument("--num-images", type=at_least(1), default=4, help="images per prompt (default 4)")
    p = sub.add_parser("variations", parents=[common], help="new images from an image's CLIP embedding")
    p.add_argument("image")
    p.add_argument("--num-images", type=at_least(1), default=4, help="variations of the image (default 4)")
    p.add_argument("--prompt", help="also condition the decoder on a caption")
    p = sub.add_parser("interpolate", parents=[common], help="frames between two images' embeddings")
    p.add_argument("image_a", help="the first frame's image")
    p.add_argument("image_b", help="the last frame's image")
    p.add_argument("--frames", type=at_least(2), default=5, help="frames, both ends included (default 5)")
    p = sub.add_parser("text-diff", parents=[common], help="move an image along a caption change")
    p.add_argument("image")
    p.add_argument("--from", dest="from_caption", required=True, help="what the image shows now")
    p.add_argument("--to", dest="to_caption", required=True, help="what it should show")
    p.add_argument("--frames", type=at_least(2), default=5, help="frames, the input's first (default 5)")
    p.add_argument("--max-angle", type=fraction(), default=0.5, help="the last frame's slerp angle (0..1)")
    p = sub.add_parser("inpaint", parents=[common], help="repaint a region of an image")
    p.add_argument("image")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="white (or transparent) = paint, black = keep")
    where.add_argument("--box", help="the region to paint: left,top,right,bottom in pixels")
    p.add_argument("--prompt", help="what to paint (without one: the image's own embedding)")
    p.add_argument("--num-images", type=at_least(1), default=1, help="images to make (default 1)")
    p = sub.add_parser("outpaint", parents=[common], help="extend the canvas around an image")
    p.add_argument("image")
    grow = p.add_mutually_exclusive_group(required=True)
    grow.add_argument("--extend", help="pixels to add: left,right,top,bottom")
    grow.add_argument("--aspect", help="grow to this aspect ratio (16:9, 1.5)")
    p.add_argument("--prompt", help="what the new region shows (without one: the image's embedding)")
    p.add_argument("--num-images", type=at_least(1), default=1, help="images to make (default 1)")
    p.add_argument("--overlap", type=fraction(high_open=True), default=0.5, help="fraction of a tile over what exists")
    p = sub.add_parser("inspect", help="print the provenance of generated PNGs")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true", help="the JSON records only")
    return parser


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


def _settings_arguments(group) -> None:
    """One flag per SampleSettings field (--decoder-guidance, --up256-steps, ...), so the command line
    and the Python API can never drift apart."""
    from unclip.settings import SampleSettings

    for f in fields(SampleSettings):
        kind = _typed(int) if f.type.startswith("int") else _typed(float) if f.type.startswith("float") else str
        group.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, help=f.metadata["help"])


def _typed(kind):
    """int / float for argparse, saying "not a number" rather than Python's "invalid literal"."""

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None

    parse.__name__ = kind.__name__
    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.mode == "inspect":
            return inspect(args.files, args.json)
        return generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# --- generation -------------------------------------------------------------------------------------------
def generate(args) -> int:
    prompt_filter = make_filter(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.mode == "text":
        allowed, code = prompts_for_rank(read_prompts(args), prompt_filter, rank, world)
        if not allowed:
            return code
    elif rank != 0:
        print(f"rank {rank}: only text prompts are split across ranks; rank 0 makes the {args.mode} images")
        return 0
    else:
        captions = [getattr(args, k, None) for k in ("prompt", "from_caption", "to_caption")]
        refused = prompt_filter.split([c for c in captions if c])[1] if prompt_filter else []
        if refused:
            report_refused(refused)
            return 1
    settings = sample_settings(args)
    pipe = load_pipeline(args, prompt_filter, rank)  # the first model loads only now
    out = Path(args.out)
    if args.mode == "text":
        written, skipped = run_text(pipe, allowed, args, settings, out)
    else:
        written, skipped = run_edit(pipe, args, settings, out)
    print(f"rank {rank}: wrote {written} images to {out}/ ({skipped} already there)")
    return 0


def prompts_for_rank(prompts: list[str], prompt_filter, rank: int, world: int) -> tuple[list[tuple[int, str]], int]:
    """(this rank's allowed (index, prompt) pairs, the exit code if there are none). Prompt i goes to
    rank i mod world; refusals are reported by the rank that owns the prompt."""
    mine = [(i, p) for i, p in enumerate(prompts) if i % world == rank]
    allowed, refused = [], []
    for i, prompt in mine:
        reason = prompt_filter.check(prompt) if prompt_filter else None
        if reason:
            refused.append((prompt, reason))
        else:
            allowed.append((i, prompt))
    report_refused(refused)
    if not allowed:
        print(f"rank {rank}: nothing to generate", file=sys.stderr)
    return allowed, (1 if refused and len(refused) == len(prompts) else 0)


def make_filter(args) -> PromptFilter | None:
    if args.no_prompt_filter:
        return None
    classifiers = [load_classifier(spec) for spec in args.prompt_classifier]
    return PromptFilter.from_file(args.blocklist, classifiers)


def caption_lines(path: str | Path, what: str = "--prompts") -> list[str]:
    """The captions in a file, one per line (blank lines skipped); `what` names the setting in errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}={path}: no such file (one caption per line)")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}={path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompts)
    if args.prompt_file:
        prompts += caption_lines(args.prompt_file)
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --prompts FILE (one per line)")
    return prompts


def report_refused(refused: list[tuple[str, str]]) -> None:
    for prompt, reason in refused:
        print(f"refused: {prompt!r} ({reason})", file=sys.stderr)


def sample_settings(args):
    """The sampling flags as SampleSettings, every value checked (finite, in range) and named by its flag."""
    from unclip.settings import SampleSettings

    given = {f.name: getattr(args, f.name) for f in fields(SampleSettings) if getattr(args, f.name) is not None}
    settings = SampleSettings(**given)
    settings.validate(name=lambda field: "--" + field.replace("_", "-"))
    return settings


def load_pipeline(args, prompt_filter, rank: int):
    import torch

    from unclip.pipeline import Pipeline

    paths = find_stack(args.stack) if args.stack else {}
    for name in ("prior", "decoder", "up256", "up1024", "clip"):
        if getattr(args, name):
            paths[name] = getattr(args, name)
    if "decoder" not in paths:
        raise ValueError("no decoder: give --decoder runs/<name>/export or --stack runs/")
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    progress = args.progress if args.progress is not None else (None if rank == 0 else False)
    return Pipeline.from_exports(
        **paths, device=device, precision=args.precision, progress=progress, prompt_filter=prompt_filter
    )


def find_stack(spec: str) -> dict[str, str]:
    """Exports under a runs folder (runs/) or a run-name prefix (runs/demo -> runs/demo-*), by kind;
    upsamplers by where they sit in the chain (the one that takes the decoder's size is up256)."""
    from unclip.decoder import decoder_config_from_record
    from unclip.export import read_export_config
    from unclip.upsampler import upsampler_config_from_record

    root = Path(spec)
    base, pattern = (
        (root, "*/export/config.json") if root.is_dir() else (root.parent, f"{root.name}*/export/config.json")
    )
    found: dict[str, list[tuple[Path, dict]]] = {}
    for config in sorted(base.glob(pattern)):
        meta = read_export_config(config.parent)
        found.setdefault(meta["kind"], []).append((config.parent, meta))
    paths: dict[str, str] = {}
    for kind in ("prior", "decoder"):
        if len(found.get(kind, [])) > 1:
            names = ", ".join(str(p) for p, _ in found[kind])
            raise ValueError(f"--stack {spec} holds several {kind} exports ({names}): pass --{kind}")
        if found.get(kind):
            paths[kind] = str(found[kind][0][0])
    if "decoder" not in paths:
        raise ValueError(f"--stack {spec}: no decoder export matches {base / pattern}")
    folder, meta = found["decoder"][0]
    size = decoder_config_from_record(meta["decoder"], str(folder / "config.json")).unet.image_size
    ups = [
        (p, upsampler_config_from_record(m["upsampler"], str(p / "config.json"))) for p, m in found.get("upsampler", [])
    ]
    for name in ("up256", "up1024"):
        takes = [(p, u) for p, u in ups if u.target_size // u.scale == size]
        if len(takes) > 1:
            names = ", ".join(str(p) for p, _ in takes)
            raise ValueError(f"--stack {spec} holds several upsamplers of {size}px images ({names}): pass --{name}")
        if not takes:
            break
        paths[name], size = str(takes[0][0]), takes[0][1].target_size
    return paths


# --- writing --------------------------------------------------------------------------------------------
def run_text(pipe, allowed: list[tuple[int, str]], args, settings, out: Path) -> tuple[int, int]:
    """Prompts in groups of about one batch, each group written before the next starts (resumable)."""
    n = args.num_images
    check_settings(out, pipe.describe(settings, "text") | {"num_images": n, "rerank": settings.rerank})
    todo, skipped = [], 0
    for i, prompt in allowed:
        folder = out / f"{i:05d}-{slug(prompt)}"
        if all((folder / f"{j:02d}.png").is_file() for j in range(n)) and (folder / "sheet.png").is_file():
            skipped += n
        else:
            todo.append((folder, prompt))
    written, group = 0, max(1, settings.batch_size // n)
    for start in range(0, len(todo), group):
        part = todo[start : start + group]
        gen = pipe.text_to_image([p for _, p in part], num_images=n, settings=settings)
        for k, (folder, prompt) in enumerate(part):
            written += save_all(gen, range(k * n, (k + 1) * n), folder, args, sheet_label=prompt)
    return written, skipped


def run_edit(pipe, args, settings, out: Path) -> tuple[int, int]:
    """One input (or pair), one folder: variations-<stem>/, inpaint-<stem>/, ..."""
    stem = Path(args.image if hasattr(args, "image") else args.image_a).stem
    if args.mode == "interpolate":
        stem = f"{Path(args.image_a).stem}-{Path(args.image_b).stem}"
    folder = out / f"{args.mode}-{slug(stem)}"
    count = getattr(args, "num_images", None) or args.frames
    names = [f"{j:02d}.png" for j in range(count)]
    if all((folder / name).is_file() for name in names) and (folder / "sheet.png").is_file():
        return 0, count
    gen = call_mode(pipe, args, settings)
    check_settings(folder, gen.settings | {"inputs": mode_inputs(args)})
    label = getattr(args, "prompt", None) or args.mode
    return save_all(gen, range(len(gen.images)), folder, args, sheet_label=label), 0


def call_mode(pipe, args, settings):
    if args.mode == "variations":
        return pipe.variations(args.image, args.num_images, prompt=args.prompt, settings=settings)
    if args.mode == "interpolate":
        return pipe.interpolate(args.image_a, args.image_b, frames=args.frames, settings=settings)
    if args.mode == "text-diff":
        return pipe.text_diff(
            args.image, args.from_caption, args.to_caption, args.frames, args.max_angle, settings=settings
        )
    if args.mode == "inpaint":
        from unclip.images import box_mask, load_image

        mask = args.mask
        if args.box:
            mask = box_mask(tuple(load_image(args.image).shape[-2:]), _ints(args.box, 4, "--box"))
        return pipe.inpaint(args.image, mask, prompt=args.prompt, num_images=args.num_images, settings=settings)
    extend = _ints(args.extend, 4, "--extend") if args.extend else None
    return pipe.outpaint(
        args.image, extend, args.aspect, args.prompt, args.num_images, overlap=args.overlap, settings=settings
    )


def mode_inputs(args) -> dict[str, Any]:
    keys = ("image", "image_a", "image_b", "mask", "box", "prompt", "from_caption", "to_caption", "frames")
    keys += ("max_angle", "extend", "aspect", "overlap", "num_images")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def save_all(gen, indices, folder: Path, args, sheet_label: str) -> int:
    """Every image of `indices` as NN.png with its provenance (those already there are kept), and the
    folder's contact sheet."""
    from unclip.grid import captioned_grid
    from unclip.provenance import image_record, save_png

    folder.mkdir(parents=True, exist_ok=True)
    written, images, labels = 0, [], []
    for j, k in enumerate(indices):
        image, rec = gen.images[k], gen.records[k]
        path = folder / f"{j:02d}.png"
        if not path.is_file():
            record = image_record(gen.settings, rec, image.size)
            save_png(image, path, record, watermark=not args.no_watermark, signature=args.signature, keep=gen.keep)
            written += 1
        images.append(image)
        labels.append(_label(rec))
    cell = min(256, max(128, images[0].width))
    sheet = captioned_grid(images, labels, columns=min(len(images), 8), cell=cell, caption_lines=2)
    sheet.save(folder / "sheet.png")
    print(f"{folder}/: {sheet_label}", flush=True)
    return written


def _label(rec: dict[str, Any]) -> str:
    parts = [f"seed {rec['seed']}"]
    for key in ("t", "theta"):
        if key in rec:
            parts.append(f"{key} {rec[key]:.2f}")
    if rec.get("clip_score") is not None:
        parts.append(f"CLIP {rec['clip_score']:.1f}")
    return ", ".join(parts)


def check_settings(folder: Path, record: dict[str, Any]) -> None:
    """A folder holds images of one set of settings: a rerun with the same ones resumes it, other
    settings are refused (the images would not match their own provenance)."""
    path = folder / "settings.json"
    record = json.loads(json.dumps(record, default=str))
    record.pop("batch_size", None)  # batching does not change what an image is
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in _diff(old, record).items()]
        if changed:
            raise ValueError(
                f"{folder} holds images made with other settings ({'; '.join(changed[:6])}): "
                "use another --out, or delete the folder to start over"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"settings.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _diff(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b)):
            out |= _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return {} if a == b else {prefix.rstrip("."): (a, b)}


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "image"


def _ints(text: str, count: int, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"{flag} takes {count} comma-separated integers, got {text!r}")
    return values


# --- inspect ------------------------------------------------------------------------------------------------
def inspect(files: list[str], as_json: bool) -> int:
    from unclip.provenance import read_provenance

    status = 0
    for name in files:
        if not Path(name).is_file():
            print(f"error: no file {name}", file=sys.stderr)
            status = 1
            continue
        try:
            info = read_provenance(name)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        if as_json:
            print(json.dumps({"file": name} | info, indent=2, default=str))
            continue
        print(f"== {name}")
        if info["parameters"] is None and info["record"] is None:
            print("no provenance (not written by unclip, or its text chunks were stripped)")
        else:
            print(info["parameters"] or "(no parameters chunk)")
            print(json.dumps(info["record"], indent=2, default=str))
        print(f"invisible watermark: {info['watermark']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
