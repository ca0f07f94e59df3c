"""Peak memory of the softmax-embedding head, forward + backward: reference against fused.

    u_hat = softmax(h k^T + c) v     h [B, N, D], k [B, m, D], c [B, m], v [m, d], all fp32

The reference (`ops.reference.softmax_head`) materialises the logits [B, N, m] and autograd keeps the
softmax [B, N, m] for the backward, which then makes two more [B, N, m] tensors; at m = 50257
that is what a language model's head costs. The fused op holds logits one tile at a time.

What is counted: every byte allocated beyond the inputs (h, k, c, v and the upstream gradient
d u_hat), gradients included, at the highest point of one forward + backward.

    CUDA  in process: max_memory_allocated() after reset_peak_memory_stats(), minus the bytes
          allocated before the measured call (the inputs; a full-size warm-up call first, so that
          Triton's compilation is not measured).
    CPU   one fresh process per variant (this file is its worker). With MALLOC_MMAP_THRESHOLD_ set
          to 64 KiB every block larger than that is its own mmap, returned to the OS when freed, so
          the resident set tracks live memory. The worker allocates the inputs, makes one tiny
          call of the op (libraries, thread pool), reads its resident set from /proc/self/statm,
          resets the resident high-water mark (writes 5 to /proc/self/clear_refs, Linux >= 4.0)
          and reads the mark after the call: peak = high-water mark - resident set before the call.
          The mark is read as VmHWM from /proc/self/status. getrusage's ru_maxrss is recorded too,
          but it is the larger of that mark and one stamped on the process whenever a thread exits,
          which clear_refs does not reset: a thread that ended after importing torch and triton
          (~600 MB at their peak) leaves ru_maxrss above anything the op does. Where the reset is
          refused, ru_maxrss is the figure and it is flagged as an upper bound.
          Page granularity (4 KiB) and the thread stacks are inside the figure.

Either way a second, unmeasured call under a dispatch mode reports the largest single tensor an
op returned (on the fused path this sees the C++ op's ATen allocations, not plain malloc).

    python profiling/head_memory.py --variant ref --blocks 1 --rows 1024 --dim 128 \\
        --classes 50257 --embed 256            # prints one JSON line
"""
import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MMAP_THRESHOLD = 65536  # bytes: MALLOC_MMAP_THRESHOLD_ for the CPU worker
VARIANTS = ("ref", "fused")


@dataclass(frozen=True)
class HeadShape:
    blocks: int    # B
    rows: int      # N, examples (tokens) per block
    dim: int       # D, the head's input width
    classes: int   # m
    embed: int     # d, the class embedding's width

    def logits_bytes(self) -> int:
        """One fp32 [B, N, m] tensor: the unit the reference's peak is made of."""
        return 4 * self.blocks * self.rows * self.classes


def head_inputs(shape: HeadShape, device, dtype=torch.float32) -> dict:
    """h, k, c, v (requiring gradients) and the upstream gradient grad_o, drawn from seed 0."""
    gen = torch.Generator().manual_seed(0)
    B, N, D, m, d = shape.blocks, shape.rows, shape.dim, shape.classes, shape.embed

    def draw(*size, scale=1.0, grad=True):
        t = (torch.randn(size, generator=gen) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)
    return {"h": draw(B, N, D), "k": draw(B, m, D, scale=D ** -0.5), "c": draw(B, m, scale=0.1),
            "v": draw(m, d), "grad_o": draw(B, N, d, grad=False)}


def load_fused_ops(device: torch.device):
    """(Ops, "") for the device (Triton on CUDA, C++ on CPU), or (None, "unavailable: <one
    line>") where they cannot be loaded. bench.py loads them through this too."""
    from noprop_fast.ops.cpp import FusedOpsUnavailable
    from noprop_fast.ops import fused_ops
    try:
        return fused_ops(device), ""
    except (FusedOpsUnavailable, ImportError) as err:
        return None, f"unavailable: {' '.join(str(err).split())}"


def head_op(variant: str, device: torch.device):
    """(op, "") with op the reference head or the device's fused head, or (None, "unavailable:
    <one line>") where the fused ops cannot be loaded."""
    if variant == "ref":
        from noprop_fast.ops.reference import softmax_head
        return softmax_head, ""
    ops, status = load_fused_ops(device)
    return (None if ops is None else ops.softmax_head), status


def forward_backward(op, inputs: dict) -> None:
    """One forward and backward; the gradients land in .grad and stay (they are counted)."""
    out = op(inputs["h"], inputs["k"], inputs["c"], inputs["v"])
    out.backward(inputs["grad_o"])


def clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        t.grad = None


class LargestTensor(TorchDispatchMode):
    """Records the largest storage any ATen op returns while active, and that op's name."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.bytes:
                self.bytes, self.op = t.untyped_storage().nbytes(), str(func)
        return out


def largest_tensor(op, inputs: dict) -> tuple[int, str]:
    clear_grads(inputs)
    with LargestTensor() as mode:
        forward_backward(op, inputs)
    clear_grads(inputs)
    return mode.bytes, mode.op


# ------------------------------------------------------------------------------------------------
# CPU: the worker, one process per variant

def resident_bytes() -> int:
    """The current resident set: /proc/self/statm's second field, in pages."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def high_water_bytes() -> int | None:
    """VmHWM, the resident high-water mark of this process's memory (None where absent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    return None


def reset_high_water_mark() -> bool:
    """Set the resident high-water mark (ru_maxrss) to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_cpu_in_this_process(variant: str, shape: HeadShape, threads: int) -> dict:
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    op, status = head_op(variant, device)
    if op is None:
        return {"variant": variant, "status": status}
    inputs = head_inputs(shape, device)
    tiny = head_inputs(HeadShape(1, 4, shape.dim, 8, shape.embed), device)
    forward_backward(op, tiny)  # loads what the op uses (BLAS, OpenMP threads) before the baseline
    del tiny
    gc.collect()
    baseline = resident_bytes()
    reset = reset_high_water_mark()
    rusage_before = max_resident_bytes()
    forward_backward(op, inputs)
    hwm, rusage = high_water_bytes(), max_resident_bytes()
    largest, largest_op = largest_tensor(op, inputs)
    exact = reset and hwm is not None
    return {"variant": variant, "status": "ok", "threads": threads, "baseline_bytes": baseline,
            "peak_bytes": (hwm if exact else rusage) - baseline,
            # without the reset the mark may predate the call: the figure is then an upper bound
            "peak_source": "VmHWM after clear_refs" if exact else "ru_maxrss (upper bound)",
            "high_water_bytes": hwm, "ru_maxrss_bytes": rusage,
            "ru_maxrss_before_call_bytes": rusage_before,
            "largest_tensor_bytes": largest, "largest_tensor_op": largest_op}


def measure_cpu(variant: str, shape: HeadShape, threads: int, timeout: float = 600) -> dict:
    """Run this file as a worker in a fresh process (MALLOC_MMAP_THRESHOLD_ set) and parse its line."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant,
           "--blocks", str(shape.blocks), "--rows", str(shape.rows), "--dim", str(shape.dim),
           "--classes", str(shape.classes), "--embed", str(shape.embed), "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": f"failed: worker ran past {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        return {"variant": variant, "status": f"failed: {errors[-1] if errors else done.returncode}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# CUDA: in process

def measure_cuda(variant: str, shape: HeadShape, device: torch.device) -> dict:
    op, status = head_op(variant, device)
    if op is None:
        return {"variant": variant, "status": status}
    inputs = head_inputs(shape, device)
    forward_backward(op, inputs)  # full size: Triton compiles here, not in the measured call
    clear_grads(inputs)
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward_backward(op, inputs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    largest, largest_op = largest_tensor(op, inputs)
    return {"variant": variant, "status": "ok", "baseline_bytes": baseline,
            "max_allocated_bytes": peak, "peak_bytes": peak - baseline,
            "largest_tensor_bytes": largest, "largest_tensor_op": largest_op}


def measure(variant: str, shape: HeadShape, device: torch.device, threads: int) -> dict:
    if device.type == "cuda":
        return measure_cuda(variant, shape, device)
    return measure_cpu(variant, shape, threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU worker: the head's peak memory, one variant "
                                     "(run by profiling/bench.py with MALLOC_MMAP_THRESHOLD_ set)")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    for name, default in (("blocks", 1), ("rows", 1024), ("dim", 128), ("classes", 50257),
                          ("embed", 256)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    shape = HeadShape(args.blocks, args.rows, args.dim, args.classes, args.embed)
    result = measure_cpu_in_this_process(args.variant, shape, args.threads)
    result["shape"] = asdict(shape)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
