"""Geometry of image edits: embedding interpolation, canvas extension, and the tile plan of outpainting.

Pure functions of shapes and masks (no model), so the pipeline's editing modes stay short and these
can be tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SIDES = ("left", "right", "top", "bottom")


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b (..., D), t in [0, 1] (unCLIP sec. 3.2)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    if float(so.min()) < 1e-6:  # (anti)parallel: the straight line, renormalized
        return F.normalize((1 - t) * a + t * b, dim=-1)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / so


def extension(
    height: int, width: int, extend: Mapping[str, int] | Sequence[int] | None = None, aspect: str | float | None = None
) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels to add: given per side ({"left": 64} or (l, r, t, b)), or as
    the total needed to reach an aspect ratio ("16:9", 1.5), split evenly between the two sides."""
    if (extend is None) == (aspect is None):
        raise ValueError("outpainting takes either the pixels to add per side or a target aspect ratio, not both")
    if extend is not None:
        if isinstance(extend, Mapping):
            unknown = set(extend) - set(SIDES)
            if unknown:
                raise ValueError(f"outpainting sides are {SIDES}, got {sorted(unknown)}")
            sides = tuple(int(extend.get(s, 0)) for s in SIDES)
        else:
            sides = tuple(int(v) for v in extend)
            if len(sides) != 4:
                raise ValueError("extend as a sequence is (left, right, top, bottom)")
        if min(sides) < 0 or max(sides) == 0:
            raise ValueError(f"outpainting adds pixels on at least one side, none negative; got {sides}")
        return sides  # type: ignore[return-value]
    ratio = parse_aspect(aspect)
    wider = width / height < ratio
    add = round(height * ratio) - width if wider else round(width / ratio) - height
    if add <= 0:
        raise ValueError(f"the {width}x{height} image already has aspect ratio {ratio:.3f}: nothing to outpaint")
    return (add // 2, add - add // 2, 0, 0) if wider else (0, 0, add // 2, add - add // 2)


def parse_aspect(aspect: str | float) -> float:
    try:
        if isinstance(aspect, str) and ":" in aspect:
            w, h = aspect.split(":")
            ratio = float(w) / float(h)
        else:
            ratio = float(aspect)
    except (ValueError, ZeroDivisionError) as e:
        raise ValueError(f"an aspect ratio is W:H or a number, got {aspect!r}") from e
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"an aspect ratio is positive, got {aspect!r}")
    return ratio


def extend_canvas(image: torch.Tensor, sides: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas (1, 3, H, W) with the image placed and the new region mid-gray, keep-mask (1, 1, H, W))."""
    left, right, top, bottom = sides
    canvas = F.pad(image, (left, right, top, bottom), value=0.0)
    keep = F.pad(torch.ones(1, 1, *image.shape[-2:]), (left, right, top, bottom), value=0.0)
    return canvas, keep


def plan_tiles(keep: np.ndarray, tile: int, stride: int) -> list[tuple[int, int]]:
    """Where to inpaint, in order: (top, left) of tile x tile windows that together cover every unknown
    pixel of `keep` (H, W, True = known). Greedy, as DALL-E 2's editor is used: each next window is
    the one that sees the most known pixels among those that still have pixels to paint, so every
    window extends what exists rather than inventing far from it."""
    height, width = keep.shape
    if height < tile or width < tile:
        raise ValueError(f"a {width}x{height} canvas is smaller than the {tile}px tile")
    tops = _positions(height, tile, stride)
    lefts = _positions(width, tile, stride)
    known = keep.astype(bool).copy()
    plan = []
    while not known.all():
        best, best_key = None, None
        for top in tops:
            for left in lefts:
                window = known[top : top + tile, left : left + tile]
                if window.all():
                    continue
                key = (window.mean(), -abs(top - height / 2) - abs(left - width / 2))
                if best_key is None or key > best_key:
                    best, best_key = (top, left), key
        assert best is not None  # the windows cover the canvas, so some window holds an unknown pixel
        top, left = best
        known[top : top + tile, left : left + tile] = True
        plan.append(best)
    return plan


def _positions(length: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride` pixels, the last flush with the end."""
    last = length - tile
    return sorted(set(list(range(0, last, max(1, stride))) + [last]))
