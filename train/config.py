"""Typed job configs: the schemas Hydra validates every YAML option and command-line override against.

Each component's dataclass lives next to its code (DataConfig in data/loader.py, ClipConfig in
unclip/clip.py, OptimConfig in train/optim.py, ...); this module assembles them into one schema per
entrypoint and registers the schemas in Hydra's ConfigStore. A misspelt key or a wrong type fails
when the config is composed, before any process group starts.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.loader import DataConfig
from train.distributed import DistributedConfig
from train.ema import EmaConfig
from train.metrics import LoggerConfig
from train.optim import OptimConfig
from train.precision import PrecisionConfig
from train.profiling import ProfileConfig
from unclip.clip import ClipConfig
from unclip.decoder import DecoderConfig
from unclip.prior import PriorConfig
from unclip.upsampler import UpsamplerConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class TrainerConfig:
    num_steps: int = 1000  # optimizer steps in the whole run (a resumed run counts from its checkpoint)
    batch_global: int | None = None  # = batch_per_gpu x grad_accum x world size; give any two
    batch_per_gpu: int | None = 32  # micro-batch per rank
    grad_accum: int | None = None  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    log_every: int = 10  # steps between metric lines
    ckpt_every: int = 500  # steps between resume checkpoints (0 = only at the end and on signals)
    ckpt_keep: int = 2  # newest checkpoints kept
    export_every: int = 0  # steps between EMA exports (0 = at the end only)
    save_at_end: bool = True  # the last step's checkpoint and export (false: benchmarks, which time steps only)
    sample_every: int = 500  # steps between sample grids (0 = never)
    val_every: int = 500  # steps between validation passes (0 = never)
    val_batches: int = 4  # held-out batches per validation pass, per rank
    eval_every: int = 0  # steps between in-training evals: FD-CLIP and CLIP score of samples (0 = never)
    eval_batches: int = 8  # held-out batches per in-training eval, per rank (FD-CLIP wants > CLIP width samples)
    resume: str = "auto"  # auto (newest checkpoint in the run dir) | never | a checkpoint path
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before training stops
    deterministic: bool = False  # deterministic algorithms, for bit-exact resume tests
    compile: bool = False  # torch.compile the trained model; ZeRO-0/1/2 (train/speed.py)
    compile_backend: str = "inductor"  # torch.compile backend ("eager" / "aot_eager": tracing only, for checks)
    compile_mode: str | None = None  # None (the backend's default) | max-autotune-no-cudagraphs | reduce-overhead
    compile_scope: str = "model"  # model (one graph) | blocks (each block on its own) | norm_act (GroupNorm+SiLU)
    compile_cache: str | None = None  # inductor's cache, kept across restarts (default: <runs_dir>/.compile_cache)
    channels_last: bool = False  # U-Net weights and activations in NHWC (ZeRO-0 with bf16_autocast or fp32)
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | off
    ema: EmaConfig = field(default_factory=EmaConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler over steps (train/profiling.py)


@dataclass
class JobConfig:
    name: str = MISSING  # the run's name: runs/<name>/ holds everything it writes
    runs_dir: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


@dataclass
class InitConfig:
    """model.init_from: start from an export's weights (train/init_from.py), every entrypoint."""

    init_from: str | None = None  # an export folder (runs/<name>/export): its weights, step 0, fresh optimizer
    init_strict: bool = True  # false: load the tensors that fit, list the others (they keep a fresh init)


@dataclass
class ClipModels(InitConfig):
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class ClipTaskConfig:
    logit_scale_init: float = 2.659  # log(1/0.07), CLIP's initial temperature
    retrieval_batches: int = 8  # held-out batches for the retrieval accuracy reported at validation


@dataclass
class ClipJob(JobConfig):
    model: ClipModels = field(default_factory=ClipModels)
    task: ClipTaskConfig = field(default_factory=ClipTaskConfig)


@dataclass
class PriorModels(InitConfig):
    clip: ClipConfig = field(default_factory=ClipConfig)  # frozen; must be the CLIP the embeddings came from
    prior: PriorConfig = field(default_factory=PriorConfig)


@dataclass
class PriorTaskConfig:
    stats_samples: int = 4096  # training samples for the per-dimension statistics (normalization=stats)
    # training samples on which the export measures the x0 error for Analytic-DPM sampling (0: none,
    # the export samples ancestrally); with model.prior.diffusion.variance=analytic only
    variance_samples: int = 1024
    val_steps: str | None = None  # sampling steps during validation (None: the prior's sample_steps)
    # a decoder export trained with this CLIP: sample grids (trainer.sample_every) decode the prior's
    # samples for held-out captions and for task.sample_prompts (a file, one caption per line)
    decoder: str | None = None
    sample_prompts: str | None = None
    sample_count: int = 8  # held-out captions per grid
    sample_steps: str = "ddim25"  # the decoder's sampling steps for grids


@dataclass
class PriorJob(JobConfig):
    model: PriorModels = field(default_factory=PriorModels)
    task: PriorTaskConfig = field(default_factory=PriorTaskConfig)


@dataclass
class DecoderModels(InitConfig):
    clip: ClipConfig = field(default_factory=ClipConfig)  # frozen: image embeddings (and caption tokens)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class DecoderTaskConfig:
    prior: str | None = None  # a prior export: sample grids also decode held-out captions through it
    sample_count: int = 8  # held-out images per sample grid
    sample_steps: str = "50"  # sampling steps for grids during training (final sampling uses the config's)
    sample_guidance: float | None = None  # None: the decoder's guidance_scale
    # a file of captions, one per line (diffusers' --validation_prompts): every grid also decodes them
    # through task.prior, next to the held-out captions
    sample_prompts: str | None = None


@dataclass
class DecoderJob(JobConfig):
    model: DecoderModels = field(default_factory=DecoderModels)
    task: DecoderTaskConfig = field(default_factory=DecoderTaskConfig)


@dataclass
class UpsamplerModels(InitConfig):
    upsampler: UpsamplerConfig = field(default_factory=UpsamplerConfig)


@dataclass
class UpsamplerTaskConfig:
    sample_count: int = 4  # held-out images per sample grid (upsampled at full size)
    sample_steps: str | None = None  # None: the upsampler's own (ddim27 / ddim15)


@dataclass
class UpsamplerJob(JobConfig):
    model: UpsamplerModels = field(default_factory=UpsamplerModels)
    task: UpsamplerTaskConfig = field(default_factory=UpsamplerTaskConfig)


SCHEMAS: dict[str, type] = {
    "clip_job": ClipJob,
    "prior_job": PriorJob,
    "decoder_job": DecoderJob,
    "upsampler_job": UpsamplerJob,
}


def experiment_entrypoint(experiment: str) -> str | None:
    """The entrypoint an experiment (conf/experiment/*.yaml) is for: they are named for it (demo_prior)
    or for an upsampler stage (paper_up256)."""
    suffix = experiment.rsplit("_", 1)[-1]
    if suffix in ("up256", "up1024"):
        return "upsampler"
    return suffix if f"{suffix}_job" in SCHEMAS else None


def register_configs() -> None:
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


register_configs()


def to_object(cfg: DictConfig) -> Any:
    """The composed DictConfig as its dataclass (type-checked once more by OmegaConf)."""
    return OmegaConf.to_object(cfg)


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a job config in-process (tests, notebooks), as `python -m train.X` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        cfg = hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)
    # As under @hydra.main: ${hydra:...} interpolations resolve, and the job config holds no hydra node.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def resolve_batch(tc: TrainerConfig, world: int) -> tuple[int, int, int]:
    """(micro-batch per rank, accumulation steps, global batch) from any two of the three."""
    g, m, a = tc.batch_global, tc.batch_per_gpu, tc.grad_accum
    if g is not None and m is not None and a is not None and g != m * a * world:
        raise ValueError(f"trainer.batch_global={g} != batch_per_gpu {m} x grad_accum {a} x {world} ranks")
    if m is not None and a is not None:
        return m, a, m * a * world
    if g is not None and m is not None:
        if g % (m * world):
            raise ValueError(f"trainer.batch_global={g} is not a multiple of batch_per_gpu {m} x {world} ranks")
        return m, g // (m * world), g
    if g is not None:
        a = a or 1
        if g % (a * world):
            raise ValueError(f"trainer.batch_global={g} is not a multiple of grad_accum {a} x {world} ranks")
        return g // (a * world), a, g
    if m is not None:
        return m, 1, m * world
    raise ValueError("give two of trainer.batch_global, trainer.batch_per_gpu and trainer.grad_accum")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
