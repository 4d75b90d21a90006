"""The Hydra command line of the training entrypoints and python -m eval; needs Hydra alone.

- check_overrides: what Hydra would misread or silently drop (an unquoted shard range, a key twice),
  refused before Hydra parses the command line;
- sweep_run_name: in a sweep (-m) each job gets its own run (or eval) directory, named by the values
  it takes of the swept keys only, so a requeued sweep job finds its own files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

BRACE_PATTERN = re.compile(r"\{[^}]*\.\.[^}]*\}")  # a shard range: {00000..00999}


def check_overrides(argv: list[str] | None = None) -> None:
    """Before Hydra parses the command line (sys.argv unless given):
    - a shard range written as the shell leaves it (data.shards=/d/{00000..00999}.tar) is a Hydra
      grammar error ("mismatched input '{'"), since Hydra reads a brace as the start of a dict: say
      how to quote it instead;
    - a key given twice is refused (Hydra would keep the last one silently). An unquoted shard range
      the shell expanded itself (data.shards=d/{00000..00007}.tar) arrives as eight overrides of one key,
      and would train on the last shard alone."""
    seen: dict[str, str] = {}
    for arg in (sys.argv if argv is None else argv)[1:]:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        if BRACE_PATTERN.search(value) and value[:1] not in "'\"":
            sys.exit(
                f"config error: in {arg!r} Hydra reads the braces as a dict. Quote the value for Hydra, "
                f"inside the shell's quotes: '{key}=\"{value}\"'"
            )
        name = key.lstrip("+~")
        if name in seen:
            hint = ""
            if ".tar" in value or "shards" in name:
                hint = (
                    " If you wrote a shard range like d/{00000..00007}.tar, the shell expanded it into one "
                    f"argument per shard: quote it, '{name}=\"d/{{00000..00007}}.tar\"'."
                )
            sys.exit(f"config error: {name} is given twice ({seen[name]!r} and {arg!r}); give it once.{hint}")
        seen[name] = arg


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
