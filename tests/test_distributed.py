"""The trainer across processes (gloo on CPU): ZeRO stages, resume after SIGKILL, SIGTERM, world size.

Most tests launch train.clip as real processes (torchrun for 2 ranks), as a user would; the signal
handler's and DeepSpeed's set-up's own tests run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_trainer import Payload
from tests.trainer_helpers import (
    ROOT,
    clip_overrides,
    command,
    env,
    metrics,
    module_command,
    run_clip,
    train_losses,
    wait_for,
)

pytestmark = pytest.mark.multiproc

# Same global batch of 8: one process with 8, or 2 ranks with 4 each, whose contrastive loss gathers
# the other rank's features (open_clip's), so both see 8x8 logits. The held-out style split by sample
# gives every layout the same samples in the same global batches.
SAME_DATA = {
    "data.split": "samples",
    "data.resampled": False,
    "data.shuffle_buffer": 0,
    "trainer.batch_per_gpu": 4,
    "optim.warmup_steps": 0,
    "trainer.ema.warmup": False,
    "trainer.ema.decay": 0.9,
}
STEPS = 6
LOSS_RTOL = 1e-4  # float32 sums in another order: ~1e-6 relative per step, compounded over 6 steps


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def single_process_reference(synthetic_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ref")
    _ok(run_clip(clip_overrides(synthetic_dir, runs, "ref", STEPS, **{**SAME_DATA, "trainer.batch_per_gpu": 8})))
    return runs / "ref"


@pytest.mark.parametrize("zero", ["zero2", "zero3"])  # ZeRO-1's flat partitions: the bf16 flat-master tests
def test_two_ranks_under_zero_match_one_process(zero, synthetic_dir, tmp_path, single_process_reference):
    logger = "offline" if zero == "zero3" else "none"
    over = clip_overrides(synthetic_dir, tmp_path, zero, STEPS, **SAME_DATA, **{"distributed": zero, "logger": logger})
    _ok(run_clip(over, nproc=2, WANDB_MODE=logger if logger == "offline" else "disabled"))
    ref, got = train_losses(single_process_reference), train_losses(tmp_path / zero)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), (step, ref, got)
    if zero == "zero3":
        # EMA is sharded per rank under ZeRO-3 and whole under ZeRO-0: the exports agree
        a = load_file(str(single_process_reference / "export" / "model.safetensors"))
        b = load_file(str(tmp_path / zero / "export" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        # one writer and one wandb run for two ranks
        lines = [m for m in metrics(tmp_path / zero) if "loss" in m]
        assert len(lines) == STEPS
        assert len(list((tmp_path / zero / "wandb").glob("offline-run-*"))) == 1


def test_killed_and_resumed_run_is_bit_exact(synthetic_dir, tmp_path):
    """SIGKILL (no chance to save) after a checkpoint, then the same command again."""
    extra = {
        "trainer.ckpt_every": 5,
        "trainer.deterministic": True,
        "data.num_workers": 1,
        "data.shuffle_buffer": 16,
        "data.crop": "random",
        "data.resolution": 28,
        "trainer.val_every": 5,
        "trainer.log_every": 5,
    }
    _ok(run_clip(clip_overrides(synthetic_dir, tmp_path, "straight", 30, **extra)))
    over = clip_overrides(synthetic_dir, tmp_path, "killed", 30, **extra)
    proc = subprocess.Popen(
        command(over), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: (tmp_path / "killed/checkpoints/step_00000010/trainer.json").exists(), proc, 180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "export").exists(), "killed too late: the run had finished"
    resumed = run_clip(over)
    _ok(resumed)
    assert "resumed from" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert train_losses(tmp_path / "straight")[30] == train_losses(tmp_path / "killed")[30]


# SIGUSR1 (SLURM's --signal) and SIGTERM take the same handler; one process is checked with SIGTERM only
@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_preemption_signal_saves_and_exits_with_the_requeue_code(synthetic_dir, tmp_path, nproc, sig):
    """SIGTERM goes to the whole process group, loader workers included, as SLURM, `timeout` and
    torchrun send it: the workers leave it to the main process, which saves. SIGUSR1 goes to the
    launcher only: torchrun dies of it without forwarding; the workers see it gone and save anyway."""
    workers = 2 if sig == signal.SIGTERM else 0
    over = clip_overrides(
        synthetic_dir, tmp_path, "pre", 100_000, **{"trainer.log_every": 1, "data.num_workers": workers}
    )
    proc = subprocess.Popen(
        command(over, nproc),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a SLURM job step has
    )
    wait_for(lambda: (tmp_path / "pre" / "metrics.jsonl").exists(), proc, 180)
    sent = time.time()
    if sig == signal.SIGTERM:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    marker = tmp_path / "pre" / "REQUEUE"
    while not marker.exists() and time.time() - sent < 30:  # orphaned workers outlive their launcher
        time.sleep(0.1)
    took = time.time() - sent
    assert took < 30, f"took {took:.1f} s to stop"
    assert "Traceback" not in err, err[-3000:]  # torchrun's own SignalException traceback is one line now
    if nproc == 1:
        assert proc.returncode == 75, err[-3000:]
    expected = sig.name if nproc == 1 or sig == signal.SIGTERM else "launcher exited"
    assert expected in marker.read_text()
    time.sleep(2)  # orphaned workers finish exiting
    stopped = int((tmp_path / "pre" / "checkpoints" / "latest").read_text().split("_")[1])
    assert stopped >= 1
    if (nproc, sig) != (2, signal.SIGTERM):
        return  # resuming is the same for every way of stopping: check it once, at 2 ranks
    # the same job name resumes from where it stopped
    resumed = run_clip(clip_overrides(synthetic_dir, tmp_path, "pre", stopped + 2, **{"trainer.log_every": 1}), nproc)
    _ok(resumed)
    assert "resumed from" in resumed.stdout and f"at step {stopped}" in resumed.stdout
    assert max(train_losses(tmp_path / "pre")) == stopped + 2
    assert not marker.exists()


def test_a_repeated_signal_still_only_asks_for_the_stop(tmp_path):
    """Under `srun torchrun` a worker gets SIGTERM twice, from SLURM and from torchrun, and must still
    save: a second signal sets the same request and reaches no other handler (a stuck run ends by the
    SIGKILL its launcher sends after its grace). The handlers from before are restored after."""
    import os

    from train.control import Control

    before = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: before.append(signum))
    try:
        control = Control(tmp_path)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert control.signal_name == "SIGUSR2" and before == []
        control.close()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert before == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_resume_at_another_world_size(synthetic_dir, tmp_path):
    first = clip_overrides(synthetic_dir, tmp_path, "elastic", 4, **{"distributed": "zero2", "trainer.ckpt_every": 2})
    _ok(run_clip(first, nproc=2))
    second = clip_overrides(synthetic_dir, tmp_path, "elastic", 6, **{"distributed": "zero2"})
    done = run_clip(second, nproc=1)
    _ok(done)
    assert "resumed from" in done.stdout and "(world size 2 -> 1)" in done.stdout
    steps = sorted(train_losses(tmp_path / "elastic"))
    assert steps == [1, 2, 3, 4, 5, 6]
    state = json.loads((tmp_path / "elastic" / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert state["world_size"] == 1 and state["samples_seen"] == 4 * 16 + 2 * 8


def test_a_full_disk_on_one_rank_stops_every_rank_within_seconds(synthetic_dir, tmp_path):
    """Rank 1's disk fills while it writes its optimizer shard of the second checkpoint; rank 0 has
    finished its own part and waits inside DeepSpeed's collective, which rank 1 will never join. Both
    stop at once (not at the 30-minute collective timeout) with the disk-full message, the partial
    checkpoint gone and the first one kept. Rank 1 stays alive after failing, its connections open, as
    under NCCL, where a peer's exit does not end the wait: rank 0 learns of it from the store. (Under
    gloo a peer's exit also breaks the wait; then the rank that lost its peer reports the cause the
    failed rank posted, not its own lost connection: train/agreement.py.)"""
    over = clip_overrides(synthetic_dir, tmp_path, "full", 6, **{"trainer.ckpt_every": 2, "distributed": "zero2"})
    started = time.time()
    done = subprocess.run(
        module_command("train.clip", over, nproc=2),
        cwd=ROOT,
        env=env(UNCLIP_FAULT_RANK="1", UNCLIP_FAULT_ENOSPC="step_00000004.tmp", UNCLIP_FAULT_LINGER="60"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    took = time.time() - started
    assert done.returncode != 0 and took < 50, f"took {took:.0f} s"
    assert "Traceback" not in done.stderr and "torchrun: worker rank" in done.stderr, done.stderr[-3000:]
    rank0 = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert rank0 and all("the disk is full: saving step_00000004" in line for line in rank0), done.stderr[-3000:]
    assert "the previous checkpoints are kept (step_00000002)" in rank0[0]
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
    # The same run resumed at 2 ranks from a checkpoint whose rank-1 optimizer shard carries a payload:
    # rank 1 refuses it, and rank 0, which loaded its own files fine, must not say "resumed" and die on
    # a lost connection: every rank stops with the refusal.
    shard = checkpoints / "step_00000002" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    torch.save(torch.load(shard, weights_only=False) | {"extra": Payload(marker)}, shard)
    resumed = subprocess.run(
        module_command("train.clip", over, nproc=2), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode != 0 and not marker.exists() and "resumed from" not in resumed.stdout
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("zero_pp_rank_1_mp_rank_00_optim_states.pt: refused to load" in e for e in errors)


def test_strict_collectives_refuse_a_tensor_handed_to_torch_distributed_directly():
    """The check every multi-process test runs under (tests/faults.py) can fail: a helper's reduction
    passes, a direct call from our own code is refused, as NCCL would refuse a CPU tensor."""
    done = subprocess.run(
        module_command("tests.strict_probe", [], nproc=2),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "refused: strict collectives: tests/strict_probe.py calls torch.distributed.all_reduce itself" in done.stdout


def test_deepspeed_does_not_build_its_shared_memory_op():
    """Its CPU shm all-reduce (a ~35 s ninja build in every new environment) serves only inference."""
    import sys

    from train.distributed import import_deepspeed

    import_deepspeed()
    assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None


def test_a_long_hidden_native_setup_says_what_it_is_doing(monkeypatch):
    """DeepSpeed's output is hidden; when that takes long, one line says why nothing is printed."""
    import threading

    import train.distributed as d

    said, fired = [], threading.Event()
    monkeypatch.setattr(d, "SLOW_NATIVE_SETUP_S", 0.01)
    monkeypatch.setattr(d, "say_still_busy", lambda fd, message: (said.append(message), fired.set()))
    with d.quiet_native_output():
        assert fired.wait(timeout=10)
    assert said and "compiles C++ ops" in said[0]
    said.clear()
    monkeypatch.setattr(d, "SLOW_NATIVE_SETUP_S", 60.0)
    with d.quiet_native_output():
        pass  # a quick block says nothing
    assert said == []
