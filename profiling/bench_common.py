"""What the benchmark's sections share: the run's sizes, the device's peaks, the MNIST model on
synthetic data, loading the fused ops, and the one-line form of a failure.

The sections: bench_step.py (the training step), bench_ops.py (each op against its reference),
bench.py's `bench_memory` (the head's peak memory, through head_memory.py), bench_loop.py (the
batched step against T separate modules in a loop), bench_memory_methods.py (activation memory per
method and schedule); bench_report.py writes the report. bench.py puts the repository and this
folder on sys.path before importing any of them.
"""
import time
from dataclasses import dataclass, field

import torch

from head_memory import HeadShape, load_fused_ops
from noprop_fast.config import ImageConfig
from noprop_fast.data.image import ImageData
from noprop_fast.trainer import build_model

H100_PEAK_BYTES = 3.35e12                       # B/s, HBM3 (SXM)
H100_PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12,  # dense tensor cores (SXM)
                   "fp32": 67e12}                   # fp32 FMA units: the kernels use IEEE fp32
ACCEPT_MEMORY_RATIO = 0.25                      # the bar: fused peak <= 0.25 x reference peak


@dataclass
class Sizes:
    """Everything a run's size depends on; `--quick` swaps in tiny values."""
    batch: int = 128            # images per step (and N of the MNIST-shaped ops)
    num_blocks: int = 10        # T
    num_classes: int = 10       # m, MNIST
    image_shape: tuple = (1, 28, 28)
    lm_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    memory_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    min_run_time: float = 0.5   # CPU: seconds per blocked_autorange measurement
    op_repeats: int = 3         # measurements per op and path, reference and fused in turn


QUICK = Sizes(batch=8, num_blocks=2, lm_head=HeadShape(1, 32, 32, 500, 16),
              memory_head=HeadShape(1, 64, 32, 2000, 32), min_run_time=0.01, op_repeats=1)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_fused(device: torch.device):
    """(FusedOps, "", load seconds) or (None, "unavailable: <reason>", seconds)."""
    start = time.perf_counter()
    ops, status = load_fused_ops(device)
    return ops, status, time.perf_counter() - start


def mnist_model(sizes: Sizes, device: torch.device, method: str = "noprop", **overrides):
    """The MNIST config's model on synthetic data of MNIST's shape. overrides: other ImageConfig
    fields (tests set dropout=0.0, so that two paths see the same activations)."""
    cfg = ImageConfig(dataset="mnist", method=method, embedding="onehot",
                      num_blocks=sizes.num_blocks, batch_size=sizes.batch, **overrides)
    x = torch.randn(sizes.batch, *sizes.image_shape)
    y = torch.arange(sizes.batch) % sizes.num_classes
    data = ImageData("mnist-shaped", x, y, x[:2], y[:2], sizes.num_classes, "synthetic (benchmark)")
    return cfg, build_model(cfg, data, device), x.to(device), y.to(device)
