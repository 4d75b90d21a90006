"""Launching: the torchrun commands the launcher builds from (faked) SLURM environments, the sbatch
templates, a real 2-process launch, a preemption through the launcher, and Hydra sweeps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.trainer_helpers import ROOT, clip_overrides, env, train_losses, wait_for
from train.slurm import env_from_slurm, expand_nodelist, master_port, requeue_sweep_job

RUN = ROOT / "launch" / "run.sh"
TEMPLATES = sorted((ROOT / "slurm").glob("*.sbatch"))


def _launcher_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    return base | {"PYTHON": sys.executable} | extra


def _dry_run(*args: str, **extra: str) -> str:
    done = subprocess.run(
        ["bash", str(RUN), *args],
        cwd=ROOT,
        env=_launcher_env(DRY_RUN="1", **extra),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _launch(cmd: list[str], timeout: int = 240, **extra: str) -> subprocess.CompletedProcess:
    """Run a launch command to its end; fail with its stderr's tail if it does not succeed."""
    done = subprocess.run(cmd, cwd=ROOT, env=_launcher_env(**extra), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start_training(cmd: list[str], run_dir: Path, **extra: str) -> subprocess.Popen:
    """Start a long run in its own process group and return once it has logged its first step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_launcher_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), proc, 180)
    return proc


def test_nodelists_expand_like_scontrol():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node-a,node-b") == ["node-a", "node-b"]
    assert expand_nodelist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
    assert expand_nodelist("single") == ["single"]


def test_single_node_command():
    out = _dry_run("train.clip", "debug=fast", NPROC="2")
    assert "-m train.torchrun --standalone --nnodes 1 --nproc_per_node 2 -m train.clip debug=fast" in out


def test_multi_node_command_from_the_slurm_environment():
    out = _dry_run(
        "train.decoder",
        "model/decoder=paper64",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="4",
        SLURM_NODEID="2",
        SLURM_JOB_NODELIST="gpu[017-020]",
        SLURM_GPUS_ON_NODE="8",
    )
    port = master_port(4242)
    assert (
        f"--nnodes 4 --node_rank 2 --rdzv_backend c10d --rdzv_endpoint gpu017:{port} --rdzv_id 4242 "
        "--nproc_per_node 8 -m train.decoder model/decoder=paper64"
    ) in out


def test_tasks_started_by_srun_get_their_rank_from_slurm():
    step = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "a[3-4]",
        "SLURM_JOB_NODELIST": "a[3-4]",
    }
    assert env_from_slurm(step)
    assert (step["RANK"], step["WORLD_SIZE"], step["LOCAL_RANK"], step["LOCAL_WORLD_SIZE"]) == ("5", "16", "1", "8")
    assert (step["MASTER_ADDR"], step["MASTER_PORT"]) == ("a3", str(master_port(7)))
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "a[3-4]"}
    assert not env_from_slurm(batch_script) and "RANK" not in batch_script  # one process: leave it alone
    launched = {"RANK": "3", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "a1"}
    assert not env_from_slurm(launched) and launched["RANK"] == "3"  # torchrun's variables win


SBATCH_OPTION = re.compile(r"^#SBATCH --([a-z-]+)(=\S+)?$")
KNOWN = {
    "nodes",
    "gpus-per-node",
    "ntasks-per-node",
    "cpus-per-task",
    "time",
    "signal",
    "requeue",
    "open-mode",
    "output",
    "error",
    "partition",
    "account",
    "mem",
    "job-name",
    "exclusive",
    "qos",
}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_templates_are_valid(template):
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    lines = template.read_text().splitlines()
    directives = [line for line in lines if line.startswith("#SBATCH")]
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(d) < first_command for d in directives), "#SBATCH lines must precede commands"
    options = {}
    for d in directives:
        m = SBATCH_OPTION.match(d)
        assert m and m.group(1) in KNOWN, d
        options[m.group(1)] = (m.group(2) or "").lstrip("=")
    assert "requeue" in options and re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert "%j" in options["output"] and options["open-mode"] == "append"
    module = "eval" if template.stem == "eval" else f"train.{template.stem}"
    entry = ROOT / "eval" / "__main__.py" if module == "eval" else ROOT / "train" / f"{template.stem}.py"
    assert lines[-1] == f'run_job {module} "$@"' and entry.exists()
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "job.sh")]).returncode == 0


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install -e .[dev] installs it)")
    scripts = [RUN, ROOT / "slurm" / "job.sh", ROOT / "benchmarks" / "gpu.sh", *TEMPLATES]
    done = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("srun_code,requeued", [(75, True), (0, False), (1, False)])
def test_job_script_names_the_run_after_the_job_and_requeues_on_the_trainer_code(tmp_path, srun_code, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", f'echo "$@ cpus=$SRUN_CPUS_PER_TASK" > {tmp_path}/srun.args\nexit {srun_code}\n')
    _stub(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/scontrol.args\n')
    script = f"source {ROOT}/slurm/job.sh; run_job train.prior model/prior=tiny"
    fake = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "99",
        "SLURM_JOB_NAME": "prior-big",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    done = subprocess.run(["bash", "-c", script], env=_launcher_env(**fake), capture_output=True, text=True)
    assert done.returncode == srun_code
    args = (tmp_path / "srun.args").read_text()
    assert "launch/run.sh train.prior name=prior-big model/prior=tiny cpus=64" in args
    assert (tmp_path / "scontrol.args").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "99"]


def test_job_script_forwards_the_preemption_warning_to_its_step_and_requeues(tmp_path):
    """sbatch --signal=B:USR1@300 signals the batch shell only: job.sh must pass it on to the srun step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # an srun step that, like launch/run.sh, saves and exits with the requeue code on USR1
    _stub(bin_dir, "srun", f"trap 'echo USR1 > {tmp_path}/step.got; exit 75' USR1\ntouch {tmp_path}/step.started\n"
                            "while true; do sleep 0.05; done\n")  # fmt: skip
    _stub(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/scontrol.args\n')
    fake = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "31", "SLURM_SUBMIT_DIR": str(ROOT)}
    script = f"source {ROOT}/slurm/job.sh; run_job train.decoder"
    job = subprocess.Popen(["bash", "-c", script], env=_launcher_env(**fake), stdout=subprocess.PIPE, text=True)
    # the job script has set its traps and started the step
    wait_for(lambda: (tmp_path / "step.started").exists(), job, 30)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 75 and (tmp_path / "step.got").exists(), out
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "31"]


@pytest.mark.multiproc
def test_a_real_two_process_cpu_launch_trains(synthetic_dir, tmp_path):
    over = clip_overrides(synthetic_dir, tmp_path, "launched", 3)
    done = _launch(["bash", str(RUN), "train.clip", *over], NPROC="2")
    assert sorted(train_losses(tmp_path / "launched")) == [1, 2, 3]
    assert "2 rank(s)" in done.stdout


@pytest.mark.multiproc
def test_two_nodes_of_a_faked_slurm_job_rendezvous_and_train_as_one(synthetic_dir, tmp_path):
    """launch/run.sh as `srun` starts it on each node of a 2-node job (here both "nodes" are this
    machine): the rendezvous comes from the SLURM variables alone, and the two torchruns form one job."""
    job_id = str(10_000 + os.getpid() % 10_000)  # the rendezvous port derives from it
    over = clip_overrides(synthetic_dir, tmp_path, "nodes", 2)
    slurm = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "localhost,localhost"}
    nodes = [
        subprocess.Popen(["bash", str(RUN), "train.clip", *over], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_launcher_env(NPROC="1", SLURM_NODEID=str(i), **slurm))
        for i in range(2)
    ]  # fmt: skip
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert any("2 rank(s)" in out for out, _ in outputs)
    assert sorted(train_losses(tmp_path / "nodes")) == [1, 2]


@pytest.mark.multiproc
def test_accelerate_launch_runs_the_same_entrypoint(synthetic_dir, tmp_path):
    """launch/accelerate.yaml: accelerate's multi-GPU launcher (torchrun underneath) starts 2 CPU ranks
    of the unchanged entrypoint, and they train as one job."""
    over = clip_overrides(synthetic_dir, tmp_path, "accel", 2)
    config = str(ROOT / "launch" / "accelerate.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2"]
    cmd += ["-m", "train.clip", *over]
    done = _launch(cmd)
    assert "2 rank(s)" in done.stdout and "batch 16 = 8 x 1 x 2" in done.stdout
    assert sorted(train_losses(tmp_path / "accel")) == [1, 2]


@pytest.mark.multiproc
def test_preemption_signal_to_the_launcher_group_saves_and_returns_the_requeue_code(synthetic_dir, tmp_path):
    over = clip_overrides(synthetic_dir, tmp_path, "pre", 100_000)
    proc = _start_training(["bash", str(RUN), "train.clip", *over], tmp_path / "pre", NPROC="2")
    os.killpg(proc.pid, signal.SIGUSR1)  # as SLURM signals every process of a job step
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 75, err[-3000:]
    stopped = int((tmp_path / "pre" / "checkpoints" / "latest").read_text().split("_")[1])
    again = clip_overrides(synthetic_dir, tmp_path, "pre", stopped + 1)  # the same job name: resumes
    resumed = _launch(["bash", str(RUN), "train.clip", *again], NPROC="1")
    assert f"at step {stopped}" in resumed.stdout


@pytest.mark.multiproc
def test_a_warning_during_start_up_is_not_lost(synthetic_dir, tmp_path):
    """USR1 to the launcher alone, while torchrun is still starting its workers: they see it at their
    first step, save and stop, and the launcher exits with the requeue code."""
    over = clip_overrides(synthetic_dir, tmp_path, "early", 100_000)
    proc = subprocess.Popen(["bash", str(RUN), "train.clip", *over], cwd=ROOT, env=_launcher_env(NPROC="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)  # the launcher has set its traps; the worker is still importing torch
    assert not (tmp_path / "early" / "metrics.jsonl").exists()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert (tmp_path / "early" / "checkpoints" / "latest").read_text().strip() == "step_00000001"


@pytest.mark.multiproc
def test_hydra_sweep_gives_each_job_its_own_run(synthetic_dir, tmp_path):
    """lr x batch through a submitit launcher (local here, SLURM on a cluster): one run per job, named by
    the swept values only, and no run directory per rank or per job number."""
    over = clip_overrides(synthetic_dir, tmp_path, "sweep", 1)
    over = [o for o in over if not o.startswith(("optim.warmup_steps", "trainer.batch_per_gpu"))]
    sweep = ["optim.lr_peak=0.001,0.002", "trainer.batch_per_gpu=4,8"]
    cmd = [sys.executable, "-m", "train.clip", "-m", "hydra/launcher=submitit_local", *sweep, *over]
    _launch(cmd, timeout=300)
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert runs == [f"optim.lr_peak={lr},trainer.batch_per_gpu={b}" for lr in ("0.001", "0.002") for b in (4, 8)]
    for run in runs:
        config = (tmp_path / "sweep" / run / "config.yaml").read_text()
        lr, batch = re.findall(r"=([\d.]+)", run)
        assert f"lr_peak: {lr}" in config and f"batch_per_gpu: {batch}" in config
        assert (tmp_path / "sweep" / run / "metrics.jsonl").exists()


@pytest.mark.multiproc
def test_a_preempted_sweep_job_saves_then_requeues_itself(synthetic_dir, tmp_path):
    """A Hydra sweep job on SLURM: submitit's preemption signal (USR2) reaches the trainer, which saves,
    and rank 0 requeues the job (its array element) with scontrol, as slurm/job.sh does for sbatch jobs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", f'echo "$@" > {tmp_path}/scontrol.args\n')
    fake = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123",
            "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3", "SLURM_PROCID": "0"}  # fmt: skip
    over = clip_overrides(synthetic_dir, tmp_path, "swept", 100_000)
    proc = _start_training([sys.executable, "-m", "train.clip", *over], tmp_path / "swept", **fake)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 75, err[-3000:]
    assert (tmp_path / "swept" / "checkpoints" / "latest").exists()
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "120_3"]
    assert "requeueing SLURM job 120_3" in out


def test_the_slurm_sweep_launcher_preset_composes():
    cmd = [sys.executable, "-m", "train.prior", "hydra/launcher=slurm", "--cfg", "hydra", "--package", "hydra.launcher"]
    launcher = yaml.safe_load(_launch(cmd, timeout=60).stdout)  # just hydra.launcher
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["signal_delay_s"]) == (8, 8, 300)


def test_only_rank_0_of_a_submitit_slurm_job_requeues(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "8"}
    assert requeue_sweep_job(job) and calls == [["scontrol", "requeue", "8"]]
    assert not requeue_sweep_job(job | {"SLURM_PROCID": "3"})  # another rank: rank 0 does it
    assert not requeue_sweep_job({"SLURM_JOB_ID": "8"})  # an sbatch job: slurm/job.sh does it
    assert not requeue_sweep_job(job | {"SUBMITIT_EXECUTOR": "local"})
    assert len(calls) == 1

    def no_scontrol(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(subprocess, "run", no_scontrol)
    assert not requeue_sweep_job(job)  # no scontrol: said, not raised
