"""NVTX ranges around the phases of a training step, for Nsight (docs/performance.md, "NVTX and
Nsight"): `with phase("forward"): ...`, in the domain "noprop_fast", coloured per PHASES; they nest.

On where NOPROP_FAST_NVTX=1 (=0: off) or a profiler's variables say so, decided once at import
(`set_enabled` changes it). BACKEND: the `nvtx` package, else torch.cuda.nvtx (default domain, no
colours: in Nsight Compute's `--nvtx-include` write `forward/`). Off, `phase(name)` is one dict
lookup returning a shared no-op (`python -m noprop_fast.nvtx_ranges` measures its cost).
"""
import contextlib
import os
import timeit

try:
    import nvtx
except ImportError:  # a machine without the package: torch's binding below, if any
    nvtx = None

torch_nvtx = None  # torch.cuda.nvtx where it can emit ranges
if nvtx is None:
    try:  # a CPU build of torch has only stubs that raise, and no `torch._C._nvtx`
        import torch.cuda.nvtx
        torch_nvtx = torch.cuda.nvtx if hasattr(torch._C, "_nvtx") else None
    except ImportError:
        pass
BACKEND = "nvtx" if nvtx is not None else "torch.cuda.nvtx" if torch_nvtx is not None else None

DOMAIN = "noprop_fast"

# One fixed colour per phase (ARGB), so a phase looks the same on every timeline.
PHASES = {
    "data": 0xFF9E9E9E,        # grey: the batch fetch
    "noise": 0xFFAB47BC,       # purple: the noisy latents (torch.randn or the Philox draws)
    "forward": 0xFF42A5F5,     # blue: the blocks' forward (GPT: the hidden states)
    "loss": 0xFFFFA726,        # orange: block losses, CE, KL
    "backward": 0xFFEF5350,    # red: zero_grad and loss.backward()
    "optimizer": 0xFF66BB6A,   # green: the optimiser step (and the fp16 loss scaler)
    "evaluation": 0xFF26C6DA,  # cyan: a whole evaluation
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


class _Range:
    """One phase's range; stateless, so one object per phase serves nested and repeated uses."""
    __slots__ = ("message", "color")

    def __init__(self, name: str, color: int):
        self.message, self.color = name, color  # the domain says whose range it is

    def __enter__(self):
        if BACKEND == "nvtx":
            nvtx.push_range(self.message, color=self.color, domain=DOMAIN)
        else:
            torch_nvtx.range_push(self.message)

    def __exit__(self, exc_type, exc, tb):
        if BACKEND == "nvtx":
            nvtx.pop_range(domain=DOMAIN)
        else:
            torch_nvtx.range_pop()
        return False  # an exception in the body propagates


_NO_RANGE = contextlib.nullcontext()  # the shared context object of a disabled phase
_RANGES = {name: _Range(name, color) for name, color in PHASES.items()}
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
