"""What the benchmark's sections share: the run's sizes, the device's peaks, the MNIST model on
synthetic data, loading the fused ops, and the one-line form of a failure.

The sections: bench_step.py (the image task's training step, five paths), bench_lm.py (the
language task's), bench_ops.py (each op against its reference), bench.py's `bench_memory` (the
head's peak memory, through head_memory.py), bench_memory_methods.py (memory per method and
schedule); bench_throughput.py times the steps, bench_loop.py is the separate-modules loop,
bench_report.py writes the report and bench_plot.py the plot. bench.py puts the repository and this
folder on sys.path before importing any of them.
"""
import time
from dataclasses import dataclass, field

import torch

from head_memory import HeadShape, load_fused_ops
from noprop_fast.config import ImageConfig, LMConfig, load_config
from noprop_fast.data.image import ImageData
from noprop_fast.tasks.image import build_model

H100_PEAK_BYTES = 3.35e12                       # B/s, HBM3 (SXM)
H100_PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12,  # dense tensor cores (SXM)
                   "fp32": 67e12}                   # fp32 FMA units: the kernels use IEEE fp32
HEAD_MEMORY_TARGET = 0.25  # the engine's target at m = 50257: fused peak <= 0.25 x reference peak


@dataclass(frozen=True)
class LMShape:
    """The language task's step: the LMConfig fields that shape it, and the vocabulary."""
    config: str                 # the named config it follows (or "tiny"), for the report
    num_blocks: int             # T
    layers_per_block: int
    width: int                  # D
    heads: int
    embed_dim: int              # d of W_embed
    seq_len: int                # L
    batch: int                  # windows per step: batch x seq_len tokens
    vocab_size: int             # V: GPT-2's 50257 for fineweb, bytes + EOT (257) for stdlib

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def lm_shape_of(name: str, vocab_size: int, **overrides) -> LMShape:
    """The shape of the named LMConfig (noprop_fast/configs/<name>.yaml), with overrides."""
    cfg = load_config(name, LMConfig)
    fields = {f: getattr(cfg, f) for f in ("num_blocks", "layers_per_block", "width", "heads",
                                          "embed_dim", "seq_len")}
    fields.update(batch=cfg.batch_size, vocab_size=vocab_size)
    fields.update(overrides)
    return LMShape(config=name, **fields)


GPT2_VOCAB, BYTE_VOCAB = 50257, 257


@dataclass
class Sizes:
    """Everything a run's size depends on; `--quick` and `--tiny` swap in smaller values."""
    batch: int = 128            # images per step (and N of the MNIST-shaped ops)
    num_blocks: int = 10        # T
    num_classes: int = 10       # m, MNIST
    image_shape: tuple = (1, 28, 28)
    lm_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    memory_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    min_run_time: float = 0.5   # CPU: seconds per blocked_autorange measurement
    op_repeats: int = 3         # measurements per op and path, reference and fused in turn
    # the language task's step: the fineweb config on CUDA, the stdlib config on a CPU
    lm_cuda: LMShape = field(default_factory=lambda: lm_shape_of("fineweb", GPT2_VOCAB))
    lm_cpu: LMShape = field(default_factory=lambda: lm_shape_of("stdlib", BYTE_VOCAB))

    def lm(self, device: torch.device) -> LMShape:
        return self.lm_cuda if device.type == "cuda" else self.lm_cpu


# --quick: the MNIST config itself for the image step and the methods' memory (the figures a
# quick run is for), small ops, heads and language model
QUICK = Sizes(lm_head=HeadShape(1, 32, 32, 500, 16), memory_head=HeadShape(1, 64, 32, 2000, 32),
              min_run_time=0.01, op_repeats=1,
              lm_cpu=lm_shape_of("stdlib", BYTE_VOCAB, batch=8))
# --tiny: the smallest shapes everywhere (the smoke test's run; its figures say nothing)
TINY_LM = LMShape("tiny", num_blocks=2, layers_per_block=1, width=32, heads=2, embed_dim=16,
                  seq_len=16, batch=2, vocab_size=64)
TINY = Sizes(batch=8, num_blocks=2, lm_head=HeadShape(1, 32, 32, 500, 16),
             memory_head=HeadShape(1, 64, 32, 2000, 32), min_run_time=0.01, op_repeats=1,
             lm_cuda=TINY_LM, lm_cpu=TINY_LM)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_fused(device: torch.device):
    """(Ops, "", load seconds) or (None, "unavailable: <reason>", seconds)."""
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
