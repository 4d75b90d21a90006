"""Resume state is read without running code: DeepSpeed's loads go through torch.load(weights_only=True).

DeepSpeed reads its checkpoints (model states, ZeRO optimizer shards, the universal conversion and
its loading) with `torch.load(weights_only=False)`, which unpickles anything: a checkpoint folder
someone else wrote, or one planted in a shared runs directory, could run code in every rank. While a
resume or a conversion runs, `weights_only_loads()` turns every torch.load into a weights-only load
that accepts, besides tensors and plain containers, only the types DeepSpeed's state is made of
(ALLOWED, found by listing the globals of checkpoints saved under every ZeRO stage, fp32 and bf16,
and of their universal form: `python -m train.safe_load CHECKPOINT_DIR` prints them). Anything else is
refused before it is built, with an error naming the file and the type.

Patching torch.load for the length of the call is the narrowest change that covers every reader:
DeepSpeed calls it from its checkpoint engine, its ZeRO-3 and universal loaders and ds_to_universal
(which `python -m train.safe_load --convert ...` runs under the same rule).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pickle
import sys
from pathlib import Path

import torch

from unclip.export import refused_pickle


class UnsafeCheckpointError(RuntimeError):
    pass


def _allowed() -> list:
    """The non-tensor types in DeepSpeed's checkpoint state (imported lazily: deepspeed is heavy)."""
    import argparse as _argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [
        collections.OrderedDict,
        collections.defaultdict,
        _argparse.Namespace,
        ZeroStageEnum,
        LossScaler,
        DynamicLossScaler,
        fragment_address,
        set,
        frozenset,
        slice,
        dict,
        list,
        tuple,
    ]
    return allowed


@contextlib.contextmanager
def weights_only_loads():
    """Inside: every torch.load is weights_only=True with DeepSpeed's types allowed."""
    real = torch.load
    allowed = _allowed()

    def load(f, *args, weights_only=None, **kwargs):  # noqa: ARG001 - DeepSpeed's weights_only=False is overruled
        with torch.serialization.safe_globals(allowed):
            try:
                return real(f, *args, weights_only=True, **kwargs)
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"{f}: refused to load: {refused_pickle(e)} (only tensors and DeepSpeed's state are "
                    "read). Resume only checkpoints you trust; if this one is yours and DeepSpeed added a "
                    "type, add it to train/safe_load.py."
                ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def unsafe_globals(folder: Path) -> dict[str, list[str]]:
    """{file: the globals torch's weights-only loader would refuse} for every .pt under folder."""
    return {str(p): torch.serialization.get_unsafe_globals_in_checkpoint(str(p)) for p in sorted(folder.rglob("*.pt"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.safe_load", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", help="list the globals each .pt file under this folder needs")
    p.add_argument("--convert", nargs=argparse.REMAINDER, help="run ds_to_universal with these arguments, safely")
    args = p.parse_args(argv)
    if args.convert is not None:
        from deepspeed.checkpoint import ds_to_universal

        sys.argv = ["ds_to_universal", *args.convert]
        with weights_only_loads():
            ds_to_universal.main(ds_to_universal.parse_arguments())
        return
    for path, names in unsafe_globals(Path(args.folder)).items():
        print(f"{path}: {', '.join(names) or '-'}")


if __name__ == "__main__":
    main()
