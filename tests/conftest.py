"""Shared fixtures: small shard sets written once per test session, a tiny random stack per module,
offline settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's accelerator: the GPU where there is one (pytest -m gpu runs training in-process there)
os.environ.setdefault("DS_ACCELERATOR", "cuda" if __import__("torch").cuda.is_available() else "cpu")

from data.scenes import SceneConfig  # noqa: E402
from data.synthetic import write_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """4 train shards x 40 samples and 1 held-out shard x 40 samples, 32 px."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root / "train", split="train", num_samples=160, resolution=32, samples_per_shard=40, progress=False)
    write_synthetic(
        root / "heldout", split="heldout", num_samples=40, resolution=32, samples_per_shard=40, progress=False
    )
    return root


@pytest.fixture(scope="session")
def simple_scene() -> SceneConfig:
    return SceneConfig(max_objects=1, position_jitter=0.0, sizes=["big"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny random-weight stack (tests/stack_helpers.py), written once per test module."""
    from tests.stack_helpers import write_stack

    return write_stack(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def pipe(stack):
    from unclip.pipeline import Pipeline

    return Pipeline.from_exports(
        prior=stack["prior"], decoder=stack["decoder"], up256=stack["up256"], up1024=stack["up1024"], progress=False
    )
