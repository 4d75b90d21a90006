"""The embedded default data set: procedurally drawn scenes whose captions name what is drawn.

"a small red circle above a blue square on a white background": shapes, colors, sizes, relative
positions and a background color, rendered at any resolution and deterministic from
(seed, split, index), so sample 123 of the held-out split is the same image on every machine,
whatever the number of writer processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 25),
    "purple": (135, 45, 175),
    "orange": (245, 135, 20),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "pink": (250, 140, 190),
    "brown": (125, 75, 30),
    "cyan": (40, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
# Half-extent of a shape as a fraction of the canvas side; "medium" is named by no word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.11, 0.14), "medium": (0.17, 0.2), "big": (0.27, 0.32)}
RELATIONS = ("above", "below", "to the left of", "to the right of")
SPLITS = {"train": 0, "heldout": 1}
TEMPLATES = ("{objects} on {background} background",)  # background carries its article


@dataclass
class SceneConfig:
    colors: list[str] = field(default_factory=lambda: list(PALETTE))
    backgrounds: list[str] = field(default_factory=lambda: list(PALETTE))
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    sizes: list[str] = field(default_factory=lambda: list(SIZES))
    max_objects: int = 2  # 1 or 2; two objects stand in a named relation
    p_two_objects: float = 0.5
    position_jitter: float = 1.0  # 0 centres a lone shape; 1 lets it roam the whole canvas
    rotation: float = 0.0  # a lone shape turns by up to this many degrees either way (0: upright, unrotated)
    # > 0: a lone shape's centre moves in steps of 1/position_grid of the side (16 at 64 px: the tiny
    # decoder's 4-pixel cells, so its convolutions see every place as the same pattern); 0: anywhere
    position_grid: int = 0
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))

    def validate(self) -> None:
        for name, allowed, given in (
            ("colors", PALETTE, self.colors),
            ("backgrounds", PALETTE, self.backgrounds),
            ("shapes", SHAPES, self.shapes),
            ("sizes", SIZES, self.sizes),
        ):
            unknown = [g for g in given if g not in allowed]
            if unknown or not given:
                raise ValueError(f"scene {name} {unknown or '[]'} not allowed; choose from {list(allowed)}")
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"rotation must be 0 to 180 degrees, got {self.rotation}")
        if self.position_grid < 0:
            raise ValueError(f"position_grid must be 0 (anywhere) or a number of steps, got {self.position_grid}")
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        if len(set(self.colors) | set(self.backgrounds)) < 2:
            raise ValueError("need at least two distinct colors so a shape differs from its background")
        for t in self.templates:
            if "{objects}" not in t or "{background}" not in t:
                raise ValueError(f"template {t!r} must contain {{objects}} and {{background}}")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of the canvas width
    y: float  # centre, fraction of the canvas height (0 is the top)
    r: float  # half-extent, fraction of the canvas side
    angle: float = 0.0  # degrees, counter-clockwise


@dataclass
class Scene:
    background: str
    objects: list[SceneObject]
    relation: str | None
    caption: str

    def to_json(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "relation": self.relation,
            "objects": [
                vars(o) | {"x": round(o.x, 4), "y": round(o.y, 4), "r": round(o.r, 4), "angle": round(o.angle, 2)}
                for o in self.objects
            ],
        }


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def sample_scene(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    background = str(rng.choice(cfg.backgrounds))
    two = cfg.max_objects == 2 and rng.random() < cfg.p_two_objects
    colors = [c for c in cfg.colors if c != background]
    if not colors:
        raise ValueError(f"every shape color equals the background {background!r}; widen scene colors")
    template = str(rng.choice(cfg.templates))
    if not two:
        obj = _object(rng, cfg, colors, cfg.sizes)
        place_alone(rng, obj, cfg)
        caption = template.format(objects=_phrase(obj), background=_article(background))
        return Scene(background, [obj], None, caption)
    # Two objects side by side or stacked never fit at "big": keep them small or medium.
    sizes = [s for s in cfg.sizes if s != "big"] or ["small"]
    first = _object(rng, cfg, colors, sizes)
    second = _object(rng, cfg, [c for c in colors if c != first.color] or colors, sizes)
    relation = str(rng.choice(RELATIONS))
    _place_pair(rng, first, second, relation)
    objects = f"{_phrase(first)} {relation} {_phrase(second)}"
    return Scene(
        background, [first, second], relation, template.format(objects=objects, background=_article(background))
    )


def _object(rng, cfg: SceneConfig, colors: list[str], sizes: list[str]) -> SceneObject:
    size = str(rng.choice(sizes))
    lo, hi = SIZES[size]
    return SceneObject(str(rng.choice(cfg.shapes)), str(rng.choice(colors)), size, 0.5, 0.5, float(rng.uniform(lo, hi)))


def _phrase(obj: SceneObject) -> str:
    """'a small red circle', 'an orange star' (medium size goes unnamed)."""
    words = ([] if obj.size == "medium" else [obj.size]) + [obj.color, obj.shape]
    return _article(" ".join(words))


def place_alone(rng, obj: SceneObject, cfg: SceneConfig) -> None:
    """Where a lone shape stands and how it is turned (no draw for a rotation of 0: the presets
    without one keep every sample they had)."""
    obj.x, obj.y = _free_position(rng, obj.r, cfg.position_jitter, cfg.position_grid)
    if cfg.rotation:
        obj.angle = float(rng.uniform(-cfg.rotation, cfg.rotation))


def scene_of(rng, cfg: SceneConfig, shape: str, color: str, size: str, background: str) -> Scene:
    """A one-object scene with the given attributes, placed and turned as the preset places them: more
    real scenes of one caption (data.following's diversity reference)."""
    lo, hi = SIZES[size]
    obj = SceneObject(shape, color, size, 0.5, 0.5, float(rng.uniform(lo, hi)))
    place_alone(rng, obj, cfg)
    caption = cfg.templates[0].format(objects=_phrase(obj), background=_article(background))
    return Scene(background, [obj], None, caption)


def _free_position(rng, r: float, jitter: float, grid: int = 0) -> tuple[float, float]:
    margin = r + 0.03
    span = (0.5 - margin) * jitter
    offsets = rng.uniform(-span, span, size=2)
    if grid and span > 0:
        offsets = _on_grid(offsets, span, grid)
    return 0.5 + float(offsets[0]), 0.5 + float(offsets[1])


def _on_grid(offsets: np.ndarray, span: float, grid: int) -> np.ndarray:
    """Offsets drawn evenly in [-span, span] -> the same draw spread evenly over the whole steps of
    1/grid that stay within span: -k .. k steps, k = floor(span * grid)."""
    k = math.floor(span * grid)
    index = np.floor((offsets + span) / (2 * span) * (2 * k + 1))  # 0 .. 2k (2k + 1 only at offset = span)
    return (np.minimum(index, 2 * k) - k) / grid


def _place_pair(rng, a: SceneObject, b: SceneObject, relation: str) -> None:
    """Put `a` {relation} `b` along one axis; jitter them a little along the other."""
    gap = float(rng.uniform(0.04, 0.1))
    total = 2 * a.r + gap + 2 * b.r  # extent of the pair along the relation axis
    lead = 0.5 - total / 2 + a.r  # along the relation axis: a before b
    trail = lead + a.r + gap + b.r
    jitter = lambda r: 0.5 + float(rng.uniform(-1, 1)) * max(0.0, 0.5 - r - 0.05) * 0.5
    if relation in ("above", "to the left of"):
        a_pos, b_pos = lead, trail
    else:
        a_pos, b_pos = trail, lead
    if relation in ("above", "below"):
        a.y, b.y, a.x, b.x = a_pos, b_pos, jitter(a.r), jitter(b.r)
    else:
        a.x, b.x, a.y, b.y = a_pos, b_pos, jitter(a.r), jitter(b.r)


def render(scene: Scene, resolution: int) -> Image.Image:
    """Draw `scene` at resolution x resolution, antialiased by drawing larger and box-filtering down."""
    supersample = max(1, min(4, 1024 // resolution))
    side = resolution * supersample
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, side)
    if supersample > 1:
        image = image.resize((resolution, resolution), Image.Resampling.BOX)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.r * side
    fill = PALETTE[obj.color]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "cross":
        t = r * 0.36
        for arm in ([(-r, -t), (r, -t), (r, t), (-r, t)], [(-t, -r), (t, -r), (t, r), (-t, r)]):
            draw.polygon(_turned(arm, cx, cy, obj.angle), fill=fill)
    else:
        draw.polygon(_turned(_outline(obj.shape, r), cx, cy, obj.angle), fill=fill)


def _outline(shape: str, r: float) -> list[tuple[float, float]]:
    """The shape's vertices around its centre (0, 0), upright."""
    if shape == "square":
        s = r * 0.88  # a square of half-side r looks larger than a circle of radius r
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return _regular(0.0, r * 0.2, r * 1.15, 3)
    if shape == "star":
        return _star(0.0, r * 0.05, r * 1.1, r * 0.45)
    if shape == "diamond":
        return [(0.0, -r), (r * 0.72, 0.0), (0.0, r), (-r * 0.72, 0.0)]
    if shape == "hexagon":
        return _regular(0.0, 0.0, r, 6, start=0.0)
    raise ValueError(f"unknown shape {shape!r}")


def _turned(points, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    """`points` around (0, 0) turned by `angle` degrees counter-clockwise and moved to (cx, cy)."""
    a = math.radians(-angle)  # y grows downwards in the image
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _regular(cx, cy, r, n, start=-math.pi / 2) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star(cx, cy, outer, inner, points=5) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        rad = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / points
        out.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return out


def make_sample(seed: int, split: str, index: int, resolution: int, cfg: SceneConfig) -> tuple[Image.Image, Scene]:
    """The one function that defines sample `index` of a split."""
    scene = sample_scene(scene_rng(seed, split, index), cfg)
    return render(scene, resolution), scene
