"""CUDA-graph-captured training steps (`--cuda-graphs`; docs/performance.md, "CUDA graphs").

The first `warmup_steps` calls run uncaptured on a side stream, so Triton has autotuned and every
lazily made state exists before capture; every batch trains exactly once. Graphs may share one
pool (safe: no two replay at once, and each step's outputs are read before the next replay). On a
CPU `CapturedStep` runs "staged": the same buffers and function, eagerly.
"""
import sys

import torch

from .nvtx_ranges import phase


def graph_unavailable_reason(device: torch.device, cfg, fused_loaded: bool = True) -> str | None:
    """Why this run's steps are not captured, in a few words; None when they are. fused_loaded:
    False where --fused fell back to the reference ops (ops.resolve_ops said why)."""
    if cfg.cuda_graphs == "off":
        return "--cuda-graphs off"
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if not cfg.fused or not fused_loaded:
        return "the reference ops are not captured (--fused captures)"
    if cfg.precision == "fp16":
        return "fp16 loss scaling reads an overflow flag on the host every step (use bf16)"
    if cfg.parallel != "none":
        return f"not captured with --parallel {cfg.parallel}"
    return None


def announce_uncaptured(device: torch.device, cfg, reason: str | None, warn) -> None:
    """The one line a run prints when it will not capture: where capture was asked for (`on`), or
    could have been expected (auto on CUDA); `off`, and auto on a CPU, stay silent."""
    choice = cfg.cuda_graphs
    if reason is not None and (choice == "on" or (choice == "auto" and device.type == "cuda")):
        warn(f"--cuda-graphs: steps run uncaptured: {reason}")


def once(warn=None):
    """`warn` (default: a line on stderr) that passes on its first line only: a run's one line
    about capture, however many graphs it tries."""
    said = []

    def say(line: str) -> None:
        if not said:
            said.append(line)
            (warn or _stderr)(line)
    return say


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def new_pool(device: torch.device):
    """A memory pool handle that several graphs can share (None on a CPU)."""
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


class CapturedStep:
    """`fn(*static_inputs) -> outputs`, replayed from a CUDA graph.

    fn: the whole step, host-sync free, reading its batch only from its arguments. example_inputs:
    tensors of the batch's shapes, dtypes and device (another shape does not fit: check `fits`).
    pool: a `new_pool` handle. warn: where the one line of a failed capture goes (default stderr);
    that step and every later one then run uncaptured.
    """

    def __init__(self, fn, example_inputs: tuple[torch.Tensor, ...], device, warmup_steps: int = 3,
                 pool=None, warn=None):
        self.fn, self.device = fn, torch.device(device)
        self.static_inputs = tuple(torch.empty_like(t, device=self.device) for t in example_inputs)
        self.staged = self.device.type != "cuda"
        self.warmup_left = 0 if self.staged else warmup_steps
        self.pool, self.warn = pool, warn or _stderr
        self.graph, self.static_outputs, self.failed, self.side_stream = None, None, None, None
        self.calls = self.replays = 0  # for tests and benchmarks

    def fits(self, *inputs: torch.Tensor) -> bool:
        """Whether `inputs` have the static buffers' shapes and dtypes (else run them uncaptured)."""
        return len(inputs) == len(self.static_inputs) and all(
            x.shape == s.shape and x.dtype == s.dtype for x, s in zip(inputs, self.static_inputs))

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor):
        if not self.fits(*inputs):
            raise ValueError("CapturedStep: inputs of another shape or dtype than the static "
                             "buffers; run them uncaptured (check fits first)")
        self.calls += 1
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        if self.staged or self.failed:
            return self.fn(*self.static_inputs)
        if self.graph is None:
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return self._side_stream_step()
            self._capture()
            if self.graph is None:  # capture failed: this batch runs uncaptured
                return self.fn(*self.static_inputs)
        with phase("replay"):
            self.graph.replay()
        self.replays += 1
        return self.static_outputs

    def _side_stream_step(self):
        """One uncaptured step on a side stream (the warm-up of PyTorch's capture recipe)."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.device)
        side, main = self.side_stream, torch.cuda.current_stream(self.device)
        side.wait_stream(main)  # the inputs were copied on the main stream
        with torch.cuda.stream(side):
            outputs = self.fn(*self.static_inputs)
        main.wait_stream(side)
        return outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = self.fn(*self.static_inputs)
        except RuntimeError as err:  # an op that cannot be captured: say so once, run uncaptured
            self.failed = " ".join(str(err).split())[:200]
            self.warn(f"--cuda-graphs: capture failed, steps run uncaptured ({self.failed})")
            return
        self.graph, self.static_outputs = graph, outputs
