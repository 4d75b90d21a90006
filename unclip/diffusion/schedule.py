"""Noise schedules and timestep respacing.

Cosine: Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
s = 0.008, betas clipped at 0.999. Linear: DDPM's betas from 1e-4 to 0.02, scaled by 1000/T.
Respacing (Improved DDPM sec. 4): sample on a subset of the T steps; the betas of the subset are
recomputed from alpha_bar so the marginals q(x_t | x_0) at the kept steps are unchanged.
Jumps (RePaint, Lugmayr et al. 2022, sec. 4.2): an inpainting schedule that goes back `jump_length`
steps by forward noising, `jump_n_sample - 1` times per stretch, so the model gets more chances to
reconcile the known region with what it paints.
"""

from __future__ import annotations

import math
import re

import numpy as np


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    t = np.arange(num_timesteps)
    betas = 1 - np.array([alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in t])
    return np.minimum(betas, max_beta)


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    if schedule == "linear":
        return linear_betas(num_timesteps)
    raise ValueError(f"diffusion schedule must be 'cosine' or 'linear', got {schedule!r}")


STEPS_SPEC = re.compile(r"ddim[1-9]\d*|[1-9]\d*(,[1-9]\d*)*")


def check_steps(spec: str | int, name: str = "sample_steps") -> str:
    """A respacing spec in its canonical text, or a ValueError naming the setting that holds it."""
    text = str(spec).strip().replace(" ", "")
    if not STEPS_SPEC.fullmatch(text):
        raise ValueError(
            f'{name}={spec!r} is not a step count: use a number of steps ("250"), DDIM\'s "ddim50", '
            'or steps per section ("10,20,30")'
        )
    return text


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """The original timesteps kept when sampling with `spec` steps.

    "250": 250 steps evenly spread (ends included); "10,20,30": sections of the range with that many
    steps each (guided-diffusion's form); "ddim27": the integer stride giving exactly 27 steps from
    t = 0 (DDIM's form)."""
    spec = check_steps(spec)
    if spec.startswith("ddim"):
        wanted = int(spec[4:])
        for stride in range(1, num_timesteps + 1):
            steps = list(range(0, num_timesteps, stride))
            if len(steps) == wanted:
                return steps
        raise ValueError(f"cannot take exactly {wanted} DDIM steps out of {num_timesteps}")
    counts = [int(c) for c in spec.split(",")]
    section = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = section + (1 if i < extra else 0)
        if count > size or count < 1:
            raise ValueError(f"cannot take {count} steps from a section of {size} (sample_steps={spec!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def jump_schedule(num_steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> list[int]:
    """The positions visited, from num_steps - 1 (pure noise) down to -1 (x_0); a step up is a jump
    back (RePaint's get_schedule_jump, on the respaced positions)."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length} and {jump_n_sample}")
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, positions = num_steps, []
    while t >= 1:
        t -= 1
        positions.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                positions.append(t)
    return positions + [-1]


def model_calls(num_steps: int, jump_length: int = 10, jump_n_sample: int = 1) -> int:
    """Reverse steps (model evaluations) the schedule takes: what a progress bar counts."""
    positions = jump_schedule(num_steps, jump_length, jump_n_sample)
    return sum(b < a for a, b in zip(positions, positions[1:]))
