"""Model FLOPs per sample, counted once at start-up, and the GPU's peak for MFU.

FLOPs are what torch.utils.flop_counter sees in one forward + backward of the task's loss on a
small batch (matrix products and convolutions, the usual MFU convention), divided by that batch's
size. MFU = FLOPs/sample x samples/s / (peak FLOP/s x GPUs).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s by device-name fragment and precision (vendor datasheets, no sparsity).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; PCIe parts are ~25% lower
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def peak_flops_per_s(precision: str) -> float | None:
    """This GPU's dense peak in FLOP/s for `precision`, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name:
            return table[precision] * 1e12 or None
    return None


def count_flops(fn) -> int:
    """FLOPs of everything `fn()` runs (call it on a small batch, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
