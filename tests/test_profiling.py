"""trainer.profile (train/profiling.py): torch.profiler over a window of training steps."""

from __future__ import annotations

import json

from tests.trainer_helpers import clip_job
from train.clip import ClipTask
from train.clip import train as train_clip


def test_profile_records_its_window_of_steps_and_a_run_ending_inside_it(synthetic_dir, tmp_path):
    """trainer.profile: steps start+1 .. start+steps under torch.profiler, the operators' table and the
    trace in <run>/profile/; a run that ends inside the window still writes what it recorded."""
    job = clip_job(synthetic_dir, tmp_path, "run", 4, **{"trainer.profile.start": 1, "trainer.profile.steps": 2})
    assert train_clip(job) == 0
    ops = (tmp_path / "run" / "profile" / "ops_rank0.txt").read_text()
    assert ops.startswith("steps 2..3 of rank 0, sorted by self_cpu_time_total")
    assert "aten::" in ops and "Self CPU" in ops
    # the step's labelled phases, one row each, in ms per step
    phases = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in ops.splitlines() if line.startswith("| ")}
    for name in ("next_batch", "loss", "finite_check", "backward", "optimizer_step", "ema"):
        assert float(phases[name][0]) == 1 and float(phases[name][1]) > 0, name
    trace = json.loads((tmp_path / "run" / "profile" / "trace_rank0.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])

    job = clip_job(synthetic_dir, tmp_path, "short", 3, **{"trainer.profile.start": 2, "trainer.profile.trace": False})
    assert train_clip(job) == 0
    assert (tmp_path / "short" / "profile" / "ops_rank0.txt").read_text().startswith("steps 3..3 of rank 0")
    assert not (tmp_path / "short" / "profile" / "trace_rank0.json").exists()


def test_a_bad_profile_window_is_one_line(synthetic_dir, tmp_path, capsys):
    from train.run import run

    job = clip_job(synthetic_dir, tmp_path, "run", 2, **{"trainer.profile.start": 1, "trainer.profile.steps": 0})
    assert run(job, ClipTask(job)) == 1
    assert "trainer.profile: start=1 steps=0 rows=40" in capsys.readouterr().err
