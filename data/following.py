"""Does a generated image show what its synthetic caption says? Caption following, measured.

For one-object captions of the synthetic set ("a big red star on a blue background"), an image is
read back the way a person would check it: every pixel gets the name of its nearest palette color,
the background is what the border shows, the object the most common other color, and its shape the
template (circle, square, ..., turned any way) that overlaps that color's silhouette best. Real
held-out scenes read back right (tested), so the accuracy of generated images measures the stack,
not the reader.

It also says how much a caption's images differ in layout: the mean distance between the shape's
centres across one caption's images (a fraction of the side), next to the same figure for real scenes
of those captions, drawn as the preset draws them. N candidates of one picture score 0. And how
flat the background is: how far its pixels away from the shape stray from its color (0 in real scenes;
a generated one shows the decoder's cell grid or a frame).

    python -m data.following samples/demo/text          # PNGs written by python -m unclip.sample
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.scenes import PALETTE, SHAPES, SceneConfig, SceneObject, _draw_shape

READ_SIDE = 64  # images are read at this size
MIN_OBJECT_PIXELS = 16  # fewer pixels off the background color than this: no object
CAPTION = re.compile(
    r"^an? (?:(?P<size>small|big) )?(?P<color>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background$"
)


@dataclass
class Reading:
    background: str
    color: str | None  # None: no object found
    shape: str | None


def parse_caption(caption: str) -> dict[str, str] | None:
    """{"color", "shape", "background", "size"} of a one-object synthetic caption (size "medium" where the
    caption names none); None for any other caption."""
    m = CAPTION.match(caption.strip())
    if not m or m["color"] not in PALETTE or m["shape"] not in SHAPES or m["background"] not in PALETTE:
        return None
    return {"color": m["color"], "shape": m["shape"], "background": m["background"], "size": m["size"] or "medium"}


_NAMES = list(PALETTE)
_COLORS = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


def read_scene(image: Image.Image, shapes: tuple[str, ...] = SHAPES) -> Reading:
    """What a one-object scene shows. Every pixel is named by its nearest palette color; the background
    is the color most of the border has, the object the most common other color, and its silhouette
    the pixels of that color (so a generated image's blurred or fringed edges do not count)."""
    background, color, mask = _silhouette(image)
    if color is None:
        return Reading(background, None, None)
    return Reading(background, color, _best_shape(mask, shapes))


def _silhouette(image: Image.Image) -> tuple[str, str | None, np.ndarray | None]:
    """(background, object color, the object's pixels) of a one-object scene, read at READ_SIDE pixels;
    no color and no pixels where nothing stands out from the background."""
    arr = np.asarray(image.convert("RGB").resize((READ_SIDE, READ_SIDE), Image.Resampling.BOX), np.float32)
    labels = ((arr[:, :, None, :] - _COLORS) ** 2).sum(-1).argmin(-1)  # (H, W) palette index
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    inside = labels[labels != background]
    if inside.size < MIN_OBJECT_PIXELS:
        return _NAMES[background], None, None
    color = int(np.bincount(inside, minlength=len(_NAMES)).argmax())
    return _NAMES[background], _NAMES[color], labels == color


# the turns worth trying per shape: its symmetry's period in 15-degree steps (a circle needs none)
PERIODS = {"circle": 15, "square": 90, "triangle": 120, "star": 72, "diamond": 180, "hexagon": 60, "cross": 90}


def _best_shape(mask: np.ndarray, shapes: tuple[str, ...]) -> str:
    """The shape whose template, scaled to the silhouette's area, centred on it and turned to fit it best,
    overlaps it most."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        unit = _template(shape, 0.3, 0.0)
        for factor in (0.9, 1.0, 1.1):
            r = round(0.3 * float(np.sqrt(mask.sum() / unit.sum())) * factor, 3)
            for angle in range(0, PERIODS[shape], 15):
                template = _template(shape, float(r), float(angle))
                ty, tx = np.nonzero(template)
                shifted = np.roll(template, (round(cy - ty.mean()), round(cx - tx.mean())), axis=(0, 1))
                iou = (shifted & mask).sum() / max(1, (shifted | mask).sum())
                if iou > best_iou:
                    best, best_iou = shape, iou
    return best


@functools.lru_cache(maxsize=8192)
def _template(shape: str, r: float, angle: float) -> np.ndarray:
    """The shape's silhouette at READ_SIDE pixels, drawn as the synthetic set draws it."""
    side = READ_SIDE * 4
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    _draw_shape(ImageDraw.Draw(canvas), SceneObject(shape, "white", "medium", 0.5, 0.5, r, angle), side)
    small = canvas.convert("L").resize((READ_SIDE, READ_SIDE), Image.Resampling.BOX)
    return np.asarray(small) > 127


def score(images: list[Image.Image], captions: list[str], shapes: tuple[str, ...] | None = None) -> dict[str, float]:
    """Fractions of images whose background, object color and shape (and all three) match the caption,
    over the images with a one-object synthetic caption (the others are counted as unparsed). The
    shape is chosen among `shapes`: by default those the captions name (all of them if only one is),
    as a person who knows the vocabulary would judge; colors among the whole palette."""
    shapes = shapes or _shapes_named(captions)
    hits = {"background": 0, "color": 0, "shape": 0, "all": 0}
    n = unparsed = 0
    for image, caption in zip(images, captions):
        truth = parse_caption(caption)
        if truth is None:
            unparsed += 1
            continue
        reading = read_scene(image, shapes)
        ok = {k: getattr(reading, k) == truth[k] for k in ("background", "color", "shape")}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
        n += 1
    return {k: v / max(1, n) for k, v in hits.items()} | {"images": n, "unparsed": unparsed}


def _shapes_named(captions: list[str]) -> tuple[str, ...]:
    """The shapes a reader chooses among: those the captions name, or all of them if only one is."""
    named = sorted({t["shape"] for t in map(parse_caption, captions) if t})
    return tuple(named) if len(named) > 1 else SHAPES


def score_by_shape(images: list[Image.Image], captions: list[str]) -> dict[str, float]:
    """{shape: the fraction of the images captioned with it whose shape reads back right}, each read
    among the shapes all the captions name (as `score` reads them): which shapes a stack gets wrong."""
    shapes = _shapes_named(captions)
    groups: dict[str, tuple[list, list]] = {}
    for image, caption in zip(images, captions):
        truth = parse_caption(caption)
        if truth is not None:
            group = groups.setdefault(truth["shape"], ([], []))
            group[0].append(image)
            group[1].append(caption)
    return {shape: score(*groups[shape], shapes)["shape"] for shape in sorted(groups)}


def by_shape_text(by_shape: dict[str, float]) -> str:
    """score_by_shape's result as text: 'circle 75%, square 62%, ...'."""
    return ", ".join(f"{k} {v:.0%}" for k, v in by_shape.items())


def by_shape_line(by_shape: dict[str, float]) -> str:
    """score_by_shape's result as the one line the CLIs print."""
    return "the shape right, by shape: " + by_shape_text(by_shape)


def centre(image: Image.Image) -> tuple[float, float] | None:
    """Where the object of a one-object scene stands (its silhouette's centre, fractions of the side)."""
    _, color, mask = _silhouette(image)
    if color is None:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) / READ_SIDE, float(ys.mean()) / READ_SIDE


def spread(images: list[Image.Image]) -> float | None:
    """Mean distance between the object's centres over every pair of `images` (fraction of the side)."""
    points = [c for c in map(centre, images) if c is not None]
    pairs = [(a, b) for i, a in enumerate(points) for b in points[i + 1 :]]
    if not pairs:
        return None
    return float(np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in pairs]))


def diversity(
    images: list[Image.Image], captions: list[str], scenes: str | SceneConfig = "simple", seed: int = 0
) -> dict:
    """{"generated": spread of each caption's images, averaged over captions, "real": the same for as
    many real scenes of each caption, placed as `scenes` (a preset's name, or scene settings) places them}."""
    from data.scenes import render, scene_of
    from data.synthetic import PRESETS

    config = PRESETS[scenes] if isinstance(scenes, str) else scenes

    groups: dict[str, list[Image.Image]] = {}
    for image, caption in zip(images, captions):
        groups.setdefault(caption, []).append(image)
    rng = np.random.default_rng(seed)
    generated, real = [], []
    for caption, group in groups.items():
        truth = parse_caption(caption)
        if truth is None or len(group) < 2:
            continue
        look = (truth["shape"], truth["color"], truth["size"], truth["background"])
        real_scenes = [scene_of(rng, config, *look) for _ in group]
        spreads = spread(group), spread([render(scene, READ_SIDE) for scene in real_scenes])
        if None not in spreads:
            generated.append(spreads[0])
            real.append(spreads[1])
    if not generated:
        return {"generated": None, "real": None, "captions": 0}
    return {"generated": float(np.mean(generated)), "real": float(np.mean(real)), "captions": len(generated)}


NEAR_SHAPE = 60  # a pixel this far (0-255, in its most-different channel) from the background is the shape's


def background_noise(image: Image.Image) -> float:
    """How far the background's pixels stray from its color: the mean over the pixels more than 3 pixels
    from the shape (at READ_SIDE) of their largest channel difference from the border's median color,
    0-255. The synthetic scenes' backgrounds are flat (0); a generated one shows texture or a frame."""
    arr = np.asarray(image.convert("RGB").resize((READ_SIDE, READ_SIDE), Image.Resampling.BOX), np.float32)
    strips = (arr[:2], arr[-2:], arr[:, :2], arr[:, -2:])
    color = np.median(np.concatenate([strip.reshape(-1, 3) for strip in strips]), axis=0)
    off = np.abs(arr - color).max(-1)
    near = off >= NEAR_SHAPE
    for _ in range(3):  # grow the shape by a pixel each way, three times: its edge is not background
        padded = np.pad(near, 1)
        near = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return float(off[~near].mean()) if (~near).any() else 0.0


def read_generated(folder: str | Path) -> tuple[list[Image.Image], list[str]]:
    """Images under `folder` written by python -m unclip.sample, with the prompts their provenance names."""
    images, captions = [], []
    for path in sorted(Path(folder).rglob("*.png")):
        with Image.open(path) as im:
            record = im.text.get("unclip") if hasattr(im, "text") else None
            if not record:
                continue  # contact sheets and foreign images carry no record
            prompt = json.loads(record).get("prompt")
            if prompt:
                images.append(im.convert("RGB"))
                captions.append(prompt)
    return images, captions


def main(argv: list[str] | None = None) -> int:
    from data.synthetic import PRESETS, scene_config_of

    p = argparse.ArgumentParser(prog="python -m data.following", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a folder of PNGs written by python -m unclip.sample text")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--preset", default="simple", choices=list(PRESETS), help="how the real reference scenes are placed")
    p.add_argument(
        "--shards", help="the stack's synthetic shard folder: the reference scenes are placed as its manifest says"
    )
    p.add_argument(
        "--min-diversity",
        type=float,
        metavar="FRACTION",
        help="fail (exit 1) unless one caption's images stand at least FRACTION as far apart as real scenes of "
        "it do: the range demo's check that a caption's candidates differ in layout",
    )
    args = p.parse_args(argv)
    if args.min_diversity is not None and not args.min_diversity > 0:
        p.error(f"--min-diversity must be a fraction above 0, got {args.min_diversity}")
    scenes, reference = args.preset, f"{args.preset} preset"
    if args.shards:  # read first: a wrong folder fails before any image is read
        try:
            scenes, reference = scene_config_of(args.shards), f"placed as in {args.shards}"
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    images, captions = read_generated(args.folder)
    if not images:
        print(f"error: no generated PNGs with prompts under {args.folder}", file=sys.stderr)
        return 1
    result = score(images, captions) | {"by_shape": score_by_shape(images, captions)}
    result["diversity"] = diversity(images, captions, scenes)
    result["background_noise"] = float(np.mean([background_noise(image) for image in images]))
    if args.json:
        print(json.dumps(result))
        return _check_range(result["diversity"], args.min_diversity)
    print(
        f"caption following over {result['images']} images: shape {result['shape']:.0%}, "
        f"color {result['color']:.0%}, background {result['background']:.0%}, all three {result['all']:.0%}"
    )
    print(by_shape_line(result["by_shape"]))
    d = result["diversity"]
    if d["generated"] is not None:
        print(
            f"layout diversity over {d['captions']} captions (mean distance between the shape's centres in one "
            f"caption's images, fraction of the side): generated {d['generated']:.2f}, real scenes of the same "
            f"captions ({reference}) {d['real']:.2f}"
        )
    print(
        f"background: its pixels away from the shape stray {result['background_noise']:.1f}/255 from its color "
        "on average (flat in real scenes: 0)"
    )
    return _check_range(d, args.min_diversity)


def _check_range(d: dict, min_fraction: float | None) -> int:
    """0 when no check is asked for or a caption's images differ in layout as asked; else 1, saying why."""
    if min_fraction is None:
        return 0
    if d["generated"] is None or not d["real"]:
        print("error: --min-diversity needs several images of a caption whose real scenes differ", file=sys.stderr)
        return 1
    if d["generated"] < min_fraction * d["real"]:
        print(
            f"error: a caption's images stand {d['generated']:.2f} apart, under {min_fraction:g} x the "
            f"{d['real']:.2f} of real scenes: the candidates do not differ in layout",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
