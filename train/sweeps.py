"""Hydra sweeps (-m): each job of a sweep gets its own run (or eval) directory, named by the values
it takes of the swept keys only, so a requeued sweep job finds its own files. Shared by the training
entrypoints and python -m eval; needs Hydra alone."""

from __future__ import annotations

from pathlib import Path


def sweep_run_name(name: str) -> str:
    """In a Hydra multirun (-m) each job gets its own run directory, named by the values it takes of the
    swept keys (runs/<name>/optim.lr_peak=0.0003,trainer.batch_global=512): stable, so a requeued sweep
    job resumes its own run, and free of the overrides every job shares (data paths, ...)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return name
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return name
    swept = _swept_keys(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    chosen = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return f"{name}/{','.join(chosen).replace('/', '.') or hydra_cfg.job.num}"


def _swept_keys(multirun_yaml: Path) -> set[str]:
    """The keys that the sweep's command line gives several values (a,b / range(...) / choice(...))."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not multirun_yaml.exists():
        return set()
    given = OmegaConf.load(multirun_yaml).hydra.overrides.task
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(given)) if o.is_sweep_override()}
