"""Reading SLURM's environment: node lists, and rank / world size for tasks that srun starts directly.

Two ways to run under SLURM, both supported:
- `srun launch/run.sh train.X ...`: one task per node starting torchrun (launch/run.sh takes the
  rendezvous from here: `python -m train.slurm first-host "$SLURM_JOB_NODELIST"`);
- one task per GPU, started by srun itself (`srun --ntasks-per-node=8 python -m train.X`, or Hydra's
  submitit launcher): init_distributed() fills RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import MutableMapping


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", nodelist):
        item = item.strip(",")
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", item)
        if not m:
            if item:
                hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def master_port(job_id: str | int) -> int:
    """A port derived from the job id: the same on every node and across requeues of one job."""
    return 20000 + int(job_id) % 20000


def env_from_slurm(env: MutableMapping[str, str]) -> bool:
    """Fill torch.distributed's variables for the tasks of an srun step (one per GPU), unless a launcher
    (torchrun) already set them. Only srun steps count: a batch script sees its allocation's task
    count but is one process, so the step's own variables (SLURM_STEP_NUM_TASKS) decide."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "RANK" in env or "SLURM_PROCID" not in env or tasks <= 1:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(tasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    env["LOCAL_WORLD_SIZE"] = str(tasks // max(1, len(nodes)))
    env.setdefault("MASTER_ADDR", nodes[0])
    env.setdefault("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID", "0"))))
    return True


def requeue_sweep_job(env: MutableMapping[str, str]) -> bool:
    """After a preemption save in a Hydra sweep job on SLURM (submitit), ask SLURM to requeue it: a sweep
    job has no job script to do it (slurm/job.sh does it for sbatch jobs). The requeued job reruns the
    same pickled Hydra job, whose run directory is named by its overrides, so it resumes. Rank 0 only."""
    if env.get("SUBMITIT_EXECUTOR") != "slurm" or env.get("SLURM_PROCID", "0") != "0":
        return False
    job = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID"):  # Hydra submits a sweep as a job array
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    print(f"requeueing SLURM job {job}", flush=True)
    try:
        return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
    except OSError as e:  # no scontrol on this node: the checkpoint is saved, a resubmission resumes it
        print(f"could not requeue SLURM job {job}: {e}", file=sys.stderr, flush=True)
        return False


def main(argv: list[str]) -> None:
    """`python -m train.slurm first-host NODELIST` / `port JOB_ID`: helpers for launch/run.sh."""
    if len(argv) == 2 and argv[0] == "first-host":
        print(expand_nodelist(argv[1])[0])
    elif len(argv) == 2 and argv[0] == "port":
        print(master_port(argv[1]))
    else:
        sys.exit("usage: python -m train.slurm first-host NODELIST | port JOB_ID")


if __name__ == "__main__":
    main(sys.argv[1:])
