"""NVTX ranges around the phases of a training step, for Nsight Systems / Nsight Compute.

    with phase("forward"):
        ...

opens the range `forward` in the NVTX domain "noprop_fast", with one fixed colour per
phase, and closes it on the way out (also when the body raises). The phases of a step:

    data        the batch fetch
    noise       the noisy latents (torch.randn or the Philox draws)
    forward     the blocks' forward: features and denoise (GPT: the hidden states)
    loss        block losses, CE, KL
    backward    zero_grad and loss.backward()
    optimizer   the optimiser step (and the fp16 loss scaler)
    evaluation  a whole evaluation (test accuracy, validation loss)
    replay      a CUDA-graph replay of a whole captured step (graphs.CapturedStep)

Ranges nest: the CE's draw of z_T is a `noise` range inside the `loss` range.

When it is on. Decided once at import, from the environment:

    NOPROP_FAST_NVTX=1 / =0          forces it on / off;
    otherwise on where a profiler is attached: Nsight Systems sets NSYS_PROFILING_SESSION_ID,
    and an NVTX tool injected by Nsight Systems or Nsight Compute sets NVTX_INJECTION64_PATH;

and only where a library to emit them is present. `set_enabled(bool)` changes it afterwards (tests).

Who emits them (`BACKEND`, decided once at import):

    "nvtx"             the `nvtx` package (a dependency of the project): ranges in the domain above,
                       with their colours;
    "torch.cuda.nvtx"  where the package is absent, torch's own NVTX binding (a CUDA build of torch
                       has it): the same names and nesting in NVTX's default domain, without
                       colours, so Nsight still shows every phase (in Nsight Compute's
                       `--nvtx-include`, write `forward/` instead of `noprop_fast@forward/`);
    None               neither (a CPU build of torch without the package): the ranges stay off.

Cost when off: `phase(name)` is one dict lookup and returns a shared no-op context object; nothing
is allocated and nothing calls into the nvtx library. CPU numbers from the development machine
(Python 3.11.7, shared cores, OMP_NUM_THREADS=1), 1e5 iterations, best of 5, three runs:

    for _ in range(n): pass                          10 ns per iteration
    for _ in range(n): with phase("data"): pass     135-138 ns per iteration  (~125 ns per use)

(`python -m noprop_fast.nvtx_ranges` repeats the measurement.) A step opens about ten ranges:
about a microsecond per step, against tens of microseconds of kernel launches at least.
When on, a range is an nvtx.push_range / pop_range pair; what that costs depends on the tool.
"""
import os
import timeit

try:
    import nvtx
except ImportError:  # a machine without the package: torch's binding below, if any
    nvtx = None


def _torch_nvtx():
    """torch.cuda.nvtx where it can emit ranges, else None: a CPU build of torch has only stubs
    that raise, and no `torch._C._nvtx`."""
    try:
        import torch
    except ImportError:
        return None
    if not hasattr(torch._C, "_nvtx"):
        return None
    import torch.cuda.nvtx
    return torch.cuda.nvtx


torch_nvtx = None if nvtx is not None else _torch_nvtx()
BACKEND = "nvtx" if nvtx is not None else "torch.cuda.nvtx" if torch_nvtx is not None else None

DOMAIN = "noprop_fast"

# One fixed colour per phase (ARGB), so a phase looks the same on every timeline.
PHASES = {
    "data": 0xFF9E9E9E,        # grey
    "noise": 0xFFAB47BC,       # purple
    "forward": 0xFF42A5F5,     # blue
    "loss": 0xFFFFA726,        # orange
    "backward": 0xFFEF5350,    # red
    "optimizer": 0xFF66BB6A,   # green
    "evaluation": 0xFF26C6DA,  # cyan
    "replay": 0xFFFFEE58,      # yellow: the CUDA-graph replay of a step
}


def enabled_by_environment(environ=os.environ, nvtx_available: bool = BACKEND is not None) -> bool:
    """The rule applied at import: the NOPROP_FAST_NVTX override, else a profiler's variables."""
    if not nvtx_available:
        return False
    override = environ.get("NOPROP_FAST_NVTX")
    if override is not None:
        return override.strip() == "1"
    return bool(environ.get("NSYS_PROFILING_SESSION_ID") or environ.get("NVTX_INJECTION64_PATH"))


class _NoRange:
    """The shared context object of a disabled phase."""
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, tb):
        return False


class _Range:
    """One phase's range; stateless, so one object per phase serves nested and repeated uses."""
    __slots__ = ("message", "color")

    def __init__(self, name: str, color: int):
        self.message, self.color = name, color  # the domain says whose range it is

    def __enter__(self):
        nvtx.push_range(self.message, color=self.color, domain=DOMAIN)

    def __exit__(self, exc_type, exc, tb):
        nvtx.pop_range(domain=DOMAIN)
        return False  # an exception in the body propagates


class _TorchRange(_Range):
    """A phase's range through torch.cuda.nvtx: the default domain, no colour."""
    __slots__ = ()

    def __enter__(self):
        torch_nvtx.range_push(self.message)

    def __exit__(self, exc_type, exc, tb):
        torch_nvtx.range_pop()
        return False


_NO_RANGE = _NoRange()
_RANGES = {name: (_TorchRange if BACKEND == "torch.cuda.nvtx" else _Range)(name, color)
           for name, color in PHASES.items()}
_OFF = {name: _NO_RANGE for name in PHASES}
_active = _OFF  # the table phase() reads: _RANGES when on, _OFF when off


def set_enabled(on: bool) -> None:
    """Turn the ranges on or off (on needs the nvtx package or a CUDA build of torch)."""
    global _active
    if on and BACKEND is None:
        raise RuntimeError("NVTX ranges need the nvtx package (pip install nvtx) or a CUDA build "
                           "of torch")
    _active = _RANGES if on else _OFF


def is_enabled() -> bool:
    return _active is _RANGES


def phase(name: str):
    """The context manager of phase `name` (one of PHASES; an unknown name is a KeyError)."""
    return _active[name]


def phase_iter(name: str, iterable):
    """`iterable` with each `next` (a batch fetch) inside phase `name`; off: `iterable` itself."""
    rng = _RANGES[name]
    return _ranged_iter(rng, iter(iterable)) if is_enabled() else iterable


def _ranged_iter(rng, iterator):
    while True:
        with rng:
            item = next(iterator, _NO_RANGE)  # _NO_RANGE: a sentinel no iterator yields
        if item is _NO_RANGE:
            return
        yield item


set_enabled(enabled_by_environment())


def noop_cost_ns(n: int = 100_000, repeat: int = 5) -> tuple[float, float]:
    """(bare loop, loop with a disabled `with phase("data")`) in ns per iteration, best of
    `repeat` runs of `n` iterations."""
    was = is_enabled()
    set_enabled(False)
    try:
        bare = min(timeit.repeat("for _ in r: pass", globals={"r": range(n)},
                                 number=1, repeat=repeat))
        ranged = min(timeit.repeat("for _ in r:\n    with phase('data'): pass", number=1,
                                   globals={"r": range(n), "phase": phase}, repeat=repeat))
    finally:
        set_enabled(was)
    return bare / n * 1e9, ranged / n * 1e9


if __name__ == "__main__":
    bare, ranged = noop_cost_ns()
    print(f"bare loop {bare:.1f} ns/iter, disabled phase {ranged:.1f} ns/iter, "
          f"{ranged - bare:.1f} ns per use")
