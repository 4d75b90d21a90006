"""Every command in the README's (and docs/PERFORMANCE.md's) bash blocks is checked against the code,
so the docs cannot drift.

Hydra entrypoints (train.*, eval; also under torchrun, launch/run.sh, accelerate and the sbatch
templates) compose with the command's overrides and type-check: every key, option and value exists.
argparse commands (data.*, unclip.sample, benchmarks.*) parse their flags with the module's own
parser, stopping before any work. make targets exist in the Makefile. What is not checked: that the
paths a command names exist on your machine (they are examples), and external tools' own flags.
The commands that make demo runs are executed by it; the rest have their own tests.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import eval.config  # noqa: F401  (registers the eval schema)
import train.config  # noqa: F401  (registers the training schemas)

ROOT = Path(__file__).resolve().parent.parent
HYDRA_APPS = {"train.clip": "clip", "train.prior": "prior", "train.decoder": "decoder", "train.upsampler": "upsampler"}
HYDRA_APPS["eval"] = "eval"
SBATCH = {"clip": "train.clip", "prior": "train.prior", "decoder": "train.decoder", "upsampler": "train.upsampler"}
SBATCH["eval"] = "eval"
EXTERNAL = ("wandb", "pip", "pytest", "curl", "ssh")  # other programs: their flags are theirs
DOCS = ("README.md", "docs/PERFORMANCE.md", "docs/GENERATION.md")


def readme_commands() -> list[tuple[str, dict[str, str]]]:
    """(command, shell variables set before it in its block) for every command line of the docs."""
    text = "\n".join((ROOT / doc).read_text() for doc in DOCS)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if len(words) == 1 and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            out.append((line.strip(), dict(variables)))
    return out


def words_of(command: str, variables: dict[str, str]) -> list[str]:
    """The command's words with $VARS expanded (an unquoted one splits into words, as in the shell)."""
    for name, value in variables.items():
        command = command.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # NPROC=2 launch/run.sh ...
        words.pop(0)
    return [w for w in words if w != "..."]


def target(words: list[str]) -> tuple[str, list[str]]:
    """(python module or make/external program, its arguments) behind any launcher."""
    head = words[0]
    if head in ("python", "python3") and words[1] == "-m":
        return words[2], words[3:]
    if head in ("torchrun",) or words[:2] == ["accelerate", "launch"]:
        i = words.index("-m")
        return words[i + 1], words[i + 2 :]
    if head == "launch/run.sh":
        return words[1], words[2:]
    if head == "sbatch":
        i = next(i for i, w in enumerate(words) if w.startswith("slurm/") and w.endswith(".sbatch"))
        return SBATCH[Path(words[i]).stem], words[i + 1 :]
    return head, words[1:]


def hydra_overrides(args: list[str]) -> list[str]:
    """The overrides a single job of the command sees: a sweep (-m) takes each key's first value."""
    sweep = "-m" in args or "--multirun" in args
    out = []
    for arg in args:
        if arg in ("-m", "--multirun") or arg.startswith(("hydra/", "hydra.")):
            continue  # launcher plugins and Hydra's own settings: checked by test_launch
        key, _, value = arg.partition("=")
        if sweep and "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


class Parsed(Exception):
    """Raised by the patched parse_args once the flags are known good."""


def check_argparse(module: str, args: list[str], monkeypatch) -> None:
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)  # exits with a usage error on a bad flag
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    found = importlib.import_module(module)
    main = getattr(found, "main", None) or importlib.import_module(f"{module}.__main__").main  # a package
    with pytest.raises(Parsed):
        main(args)


def check_hydra(program: str, args: list[str]) -> None:
    """The command's config composes: every key, option and value exists and has its type."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3", job_name=HYDRA_APPS[program]):
        cfg = compose(HYDRA_APPS[program], hydra_overrides(args), return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in names resolves as under @hydra.main
    with_required = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_object(with_required)


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("command,variables", COMMANDS, ids=[c[:60] for c, _ in COMMANDS])
def test_readme_command(command, variables, monkeypatch):
    program, args = target(words_of(command, variables))
    if program == "make":
        makefile = (ROOT / "Makefile").read_text()
        targets = [t for t in args if "=" not in t]  # make VAR=value target
        assert all(re.search(rf"^{re.escape(t)}:", makefile, re.M) for t in targets), command
    elif program in HYDRA_APPS:
        check_hydra(program, args)
    elif program in EXTERNAL:
        pass
    elif program == "bash":  # a script of this repository: it exists and parses (outside it: not ours)
        script = args[0]
        if not script.startswith("../"):
            assert (ROOT / script).is_file() and subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
    else:
        check_argparse(program, args, monkeypatch)


@pytest.mark.parametrize("preset", ["simple", "varied", "moved"])
def test_the_demo_training_commands_compose(preset):
    """make demo's training and eval commands, with each preset's own overrides (varied and moved add
    the convolutional CLIP, the longer-trained decoder and the check that candidates differ), compose
    like the docs' commands."""
    dry = subprocess.run(
        ["make", "-n", "demo", f"DEMO_PRESET={preset}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    lines = dry.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if " -m train." in line or " -m eval " in line]
    stages = ["train.clip", "train.prior", "train.decoder", "train.upsampler", "eval"]
    assert [words[words.index("-m") + 1] for words in commands] == stages
    for words in commands:
        check_hydra(words[words.index("-m") + 1], words[words.index("-m") + 2 :])
    assert ("model/clip=tiny_resnet" in dry) == ("--min-diversity" in dry) == (preset != "simple")
    decoder = next(words for words in commands if "train.decoder" in words)
    steps = {"simple": [], "varied": ["trainer.num_steps=1800"], "moved": ["trainer.num_steps=3000"]}[preset]
    assert [w for w in decoder if w.startswith("trainer.num_steps=")] == steps


def test_the_demo_reads_its_data_where_demo_dir_points():
    """DEMO_DIR moves every stage's scenes and embeddings, not only the data it writes: a stage left on
    datasets/demo would train on another preset's scenes without a word."""
    dry = subprocess.run(
        ["make", "-n", "demo", "DEMO_DIR=elsewhere"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")
    commands = [line for line in dry.splitlines() if " -m train." in line or " -m eval " in line]
    assert len(commands) == 5 and "datasets/demo" not in dry
    for line in commands:
        words = shlex.split(line)
        paths = [w.split("=", 1)[1] for w in words if w.startswith(("data.shards=", "data.embeddings="))]
        assert paths and all(p.startswith("elsewhere/") for p in paths), line


def test_demo_generate_and_eval_train_nothing():
    """make demo-generate and demo-eval redraw and rescore the stack in runs/ as it is: a rerun after a
    change to sampling must not retrain the CLIP, the prior and the decoder first (half an hour on the
    moved preset)."""
    for target in ("demo-generate", "demo-eval"):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert " -m train." not in dry and "--out datasets/" not in dry, target
        assert (" -m unclip.sample " in dry) == (target == "demo-generate")
        assert (" -m eval " in dry) == (target == "demo-eval")


def test_demo_generate_without_a_stack_says_so_and_keeps_the_last_images(tmp_path):
    """Before it clears samples/demo, demo-generate checks that the stack is there: without it the last
    images stay, and the error names what is missing and how to make it."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / ".venv").mkdir()
    for stamp in (".installed", ".installed-dev"):  # set-up done: newer than pyproject.toml
        (tmp_path / ".venv" / stamp).touch()
        os.utime(tmp_path / ".venv" / stamp, (time.time() + 60, time.time() + 60))
    (tmp_path / "samples" / "demo").mkdir(parents=True)
    (tmp_path / "samples" / "demo" / "earlier.png").touch()
    for part in ("clip", "prior", "decoder"):
        (tmp_path / "runs" / f"demo-{part}" / "export").mkdir(parents=True)
    done = subprocess.run(["make", "demo-generate"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
    assert "runs/demo-upsampler/export is missing: make demo trains the stack first" in done.stderr
    assert (tmp_path / "samples" / "demo" / "earlier.png").exists()
