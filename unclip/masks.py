"""Random masks for training the inpainting decoder (GLIDE's fine-tune): rectangles and free-form strokes.

A mask is (B, 1, H, W) with 1 where the image is known and 0 where it is to be painted. Every
random choice comes from one numpy Generator, so masks are a pure function of their seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def rectangle_hole(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random box covering roughly 10% to 60% of the image, to be painted."""
    area = rng.uniform(0.1, 0.6) * size * size
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = int(min(size, max(2, round(math.sqrt(area / aspect)))))
    w = int(min(size, max(2, round(math.sqrt(area * aspect)))))
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    hole = np.zeros((size, size), dtype=bool)
    hole[top : top + h, left : left + w] = True
    return hole


def stroke_hole(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few thick random brush strokes (free-form masks, as in DeepFill v2)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, size, 2)
        width = max(2, int(rng.uniform(0.06, 0.18) * size))
        points = [(x, y)]
        for _ in range(int(rng.integers(2, 6))):
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.4) * size
            x = float(np.clip(x + length * math.cos(angle), 0, size - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, size - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        for px, py in points:
            draw.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=255)
    return np.asarray(canvas) > 0


def random_masks(batch: int, size: int, seed: int, p_rectangle: float = 0.5, p_empty: float = 0.1) -> torch.Tensor:
    """(B, 1, size, size) float masks, 1 = known. A fraction p_empty is all zeros (nothing known: the
    decoder keeps plain generation); of the rest, p_rectangle are boxes and the others strokes."""
    rng = np.random.default_rng(seed)
    masks = np.ones((batch, 1, size, size), dtype=np.float32)
    for i in range(batch):
        u = rng.random()
        if u < p_empty:
            masks[i] = 0.0
        else:
            hole = rectangle_hole(rng, size) if rng.random() < p_rectangle else stroke_hole(rng, size)
            masks[i, 0][hole] = 0.0
    return torch.from_numpy(masks)
