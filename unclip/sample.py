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

import hashlib
import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from unclip.safety import PromptFilter, load_classifier
from unclip.sample_args import MODES, STACK_PARTS, build_parser

# pipeline, provenance and torch load lazily: refusals and --help come before any model does
__all__ = ["MODES", "build_parser", "main"]


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

    given = {f.name: getattr(args, f.name) for f in fields(SampleSettings) if getattr(args, f.name, None) is not None}
    settings = SampleSettings(**given)
    settings.validate(name=lambda field: "--" + field.replace("_", "-"))
    return settings


def stack_paths(args) -> dict[str, str]:
    """The exports named by stack_arguments' flags: --stack's, each overridden by its own flag."""
    paths = find_stack(args.stack) if args.stack else {}
    for name in STACK_PARTS:
        if getattr(args, name):
            paths[name] = getattr(args, name)
    if "decoder" not in paths:
        raise ValueError("no decoder: give --decoder runs/<name>/export or --stack runs/")
    return paths


def load_pipeline(args, prompt_filter, rank: int):
    import torch

    from unclip.pipeline import Pipeline

    paths = stack_paths(args)
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
        (root, "*/export/config.json") if root.is_dir() else (root.parent, f"{root.name}-*/export/config.json")
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
        # the slug reads well; the hash of the exact prompt keeps "A star!" and "a star" apart
        folder = out / f"{i:05d}-{slug(prompt)}-{short_hash(prompt)}"
        if all((folder / f"{j:02d}.png").is_file() for j in range(n)) and (folder / "sheet.png").is_file():
            check_stored_prompt(folder, prompt)
            skipped += n
        else:
            todo.append((folder, prompt))
    written, group = 0, max(1, settings.batch_size // n)
    for start in range(0, len(todo), group):
        part = todo[start : start + group]
        gen = pipe.text_to_image([p for _, p in part], num_images=n, settings=settings)
        say_notes(gen)
        for k, (folder, prompt) in enumerate(part):
            written += save_all(gen, range(k * n, (k + 1) * n), folder, args, sheet_label=prompt)
            (folder / "prompt.txt").write_text(prompt + "\n")
    return written, skipped


def run_edit(pipe, args, settings, out: Path) -> tuple[int, int]:
    """One input (or pair), one folder: variations-<stem>/, inpaint-<stem>/, ..."""
    stem = Path(args.image if hasattr(args, "image") else args.image_a).stem
    if args.mode == "interpolate":
        stem = f"{Path(args.image_a).stem}-{Path(args.image_b).stem}"
    inputs = mode_inputs(args) | {
        "image_paths": [
            str(Path(getattr(args, k)).resolve()) for k in ("image", "image_a", "image_b") if getattr(args, k, None)
        ]
    }
    folder = out / f"{args.mode}-{slug(stem)}-{short_hash(json.dumps(inputs, sort_keys=True, default=str))}"
    count = getattr(args, "num_images", None) or args.frames
    names = [f"{j:02d}.png" for j in range(count)]
    if all((folder / name).is_file() for name in names) and (folder / "sheet.png").is_file():
        return 0, count
    gen = call_mode(pipe, args, settings)
    say_notes(gen)
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


def say_notes(gen) -> None:
    for note in dict.fromkeys(gen.notes):
        print(f"note: {note}", file=sys.stderr, flush=True)


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


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def check_stored_prompt(folder: Path, prompt: str) -> None:
    """A folder about to be skipped as done must hold this very prompt's images."""
    stored = folder / "prompt.txt"
    if stored.is_file() and stored.read_text().rstrip("\n") != prompt:
        raise ValueError(
            f"{folder} holds the images of another prompt ({stored.read_text().strip()!r}): use another --out"
        )


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
