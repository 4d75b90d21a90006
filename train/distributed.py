"""Process groups and the DeepSpeed configuration, in one place.

The helpers work in a single process with no process group: get_rank() is 0, get_world_size()
is 1, all_reduce is the identity. So every code path runs the same from 1 CPU process to many nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from train.slurm import env_from_slurm


@dataclass
class DistributedConfig:
    zero_stage: int = 0  # 0 = plain data parallel (DDP-like), 1/2/3 = ZeRO stages
    offload_optimizer: bool = False  # ZeRO-2/3: optimizer state (and the Adam step) on the CPU
    offload_params: bool = False  # ZeRO-3: parameters on the CPU between uses
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    timeout_minutes: int = 30  # collective timeout: a rank stuck this long fails the job loudly
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass (GPU only)
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO-3 parameter prefetch, in elements
    stage3_param_persistence_threshold: int = 100_000  # ZeRO-3 keeps parameters smaller than this whole

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"distributed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs zero_stage=3")
        if self.offload_optimizer and self.zero_stage < 2:
            raise ValueError("distributed.offload_optimizer needs zero_stage 2 or 3")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed.backend must be auto, nccl or gloo, got {self.backend!r}")


# --- tiny helpers that work without a process group ----------------------------------------------
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


# --- collectives: the only place our code hands tensors to torch.distributed ---------------------
# NCCL takes CUDA tensors only, gloo takes CPU tensors; the code that reduces a statistic should not
# have to know which. Each helper stages its tensors on the backend's device (comm_device) and copies
# the result back where they live, so a CPU float64 sum reduces under NCCL and a GPU tensor under gloo.
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def comm_device() -> torch.device:
    """Where the backend takes tensors: this rank's GPU for NCCL, the CPU otherwise."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min) of `t` wherever it lives; the identity in one process."""
    if is_initialized() and get_world_size() > 1:
        staged_all_reduce(t, op)
    return t


def staged_all_reduce(t: torch.Tensor, op: str = "sum") -> None:
    """dist.all_reduce of `t` through a copy on the backend's device when it lives elsewhere."""
    where = comm_device()
    staged = t if t.device == where and t.is_contiguous() else t.to(where, memory_format=torch.contiguous_format)
    dist.all_reduce(staged, op=_OPS[op])
    if staged is not t:
        t.copy_(staged)


def all_reduce_many(tensors, op: str = "sum") -> None:
    """All-reduce several tensors of one dtype in place, as one collective (one flat buffer)."""
    tensors = list(tensors)
    if not (is_initialized() and get_world_size() > 1) or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(comm_device()) for t in tensors])
    all_reduce(flat, op)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (collective)."""
    return bool(all_reduce(torch.tensor([int(flag)]), op="max").item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (pickled; NCCL moves the bytes through the current GPU itself)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank())
    return torch.device("cpu")


def init_distributed(cfg: DistributedConfig) -> None:
    """Join the process group that torchrun / srun describe in the environment.

    One process (no torchrun rendezvous in the environment) gets a private group of one, on an in-memory store:
    DeepSpeed needs a group, and a single job must not grab a TCP port that a neighbour uses."""
    cfg.validate()
    env_from_slurm(os.environ)  # tasks started by srun directly (no torchrun): take rank and world from SLURM
    # DeepSpeed still calls collectives that newer torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if is_initialized():
        return
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    _set_timeout(timeout)
    if "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)  # DeepSpeed reads these even in one process
    deepspeed = import_deepspeed()
    with quiet_native_output():  # its comm layer wraps the group, building its CPU op on first use
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def init_process_group(backend: str = "auto", timeout_minutes: int = 30) -> None:
    """Join the process group torchrun / srun describe, for code that reduces statistics without
    DeepSpeed (evaluation); in one process nothing is started and the helpers above are identities."""
    env_from_slurm(os.environ)
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(get_local_rank())
    _set_timeout(datetime.timedelta(minutes=timeout_minutes))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _set_timeout(timeout: datetime.timedelta) -> None:
    """Remember how long a collective may wait (agreements wait as long), and who launched us."""
    global collective_timeout_s, launcher_pid
    collective_timeout_s = timeout.total_seconds()
    # torchrun's agent hosts the rendezvous store: when it dies, the store goes with it (train.agreement)
    launcher_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


collective_timeout_s = 30 * 60.0
launcher_pid: int | None = None


SLOW_NATIVE_SETUP_S = 15.0  # after this long in a hidden block, say why nothing is printed


@contextlib.contextmanager
def quiet_native_output(
    slow_message: str = "still setting up DeepSpeed (a new machine's first run compiles C++ ops, output hidden)",
):
    """Hide what native code prints to the terminal (DeepSpeed's op checks run gcc on machines without
    CUDA or libaio and print its command lines); shown after all if the block fails. A block that
    takes longer than SLOW_NATIVE_SETUP_S prints one line saying what it is doing, not silence."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    notice = threading.Timer(SLOW_NATIVE_SETUP_S, say_still_busy, (saved[1], slow_message))
    notice.daemon = True
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        notice.start()
        try:
            yield
        except BaseException:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            notice.cancel()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def say_still_busy(fd: int, message: str) -> None:
    """The one line a long hidden block prints, on the real stderr."""
    with contextlib.suppress(OSError):  # the block may end, and close fd, as this fires
        os.write(fd, f"{message}...\n".encode())


def import_deepspeed():
    with quiet_native_output():
        import deepspeed

    # by module path: `import deepspeed.comm.torch as m` binds the `torch` that deepspeed.comm imports
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    # DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce op on CPU (ninja, ~30 s in
    # every new environment) that only its inference all-reduce uses; training reduces through
    # torch.distributed (gloo on CPU). Skip the build: the first run of a fresh clone starts 30 s sooner.
    ds_torch_comm.build_shm_op = _no_shm_op
    return deepspeed


def _no_shm_op():
    return None


def destroy_distributed() -> None:
    """Leave a launcher's process group at the end of a job. A private one-process group stays:
    DeepSpeed caches its groups, and in-process callers (tests, notebooks) train again in it."""
    if is_initialized() and "MASTER_ADDR" in os.environ:
        dist.destroy_process_group()


def deepspeed_config(
    cfg: DistributedConfig,
    *,
    precision: str,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float,
    optimizer: dict[str, Any] | None = None,
    autocast: bool = False,
    flat_master: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run. `precision` is already resolved (bf16|fp16|fp32);
    with `autocast` it is the autocast dtype over fp32 weights (DeepSpeed's torch_autocast). With
    `flat_master`, bf16 weights at stage 0 or 1 train through DeepSpeed's BF16_Optimizer: fp32 master
    weights and gradients in flat buffers (stage 1 with fp32 gradient accumulation; on one GPU it
    partitions nothing), instead of stage 0's per-tensor wrapper (train/precision.py)."""
    cfg.validate()
    on_gpu = torch.cuda.is_available()
    bf16_flat = flat_master and precision == "bf16" and not autocast and cfg.zero_stage <= 1
    zero: dict[str, Any] = {"stage": 1 if bf16_flat else cfg.zero_stage}
    if zero["stage"] >= 1:
        zero |= {
            "reduce_bucket_size": cfg.reduce_bucket_size,
            "overlap_comm": cfg.overlap_comm and on_gpu,
            "contiguous_gradients": True,
            "allgather_bucket_size": cfg.reduce_bucket_size,
        }
    if cfg.zero_stage == 3:
        zero |= {
            "stage3_prefetch_bucket_size": cfg.stage3_prefetch_bucket_size,
            "stage3_param_persistence_threshold": cfg.stage3_param_persistence_threshold,
            # the export gathers weights itself; no need for DeepSpeed's 16-bit copy on save
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16" and not autocast},
        "fp16": {
            "enabled": precision == "fp16" and not autocast,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        # A client optimizer is fine on the CPU (tests); with offload on GPU we hand DeepSpeed the
        # optimizer spec so it picks its fast CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
    }
    if autocast:
        ds["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[precision]}
    if bf16_flat:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if optimizer is not None:
        ds["optimizer"] = optimizer
    return ds
