"""NVTX ranges where the `nvtx` package is absent (as on machines without it): they go through
torch.cuda.nvtx, with the same names and nesting, so Nsight still shows the phases; with neither the
package nor a CUDA build of torch they stay off, and turning them on is a clear error.

The package is hidden in a fresh process (tests/hidden_packages.py). A CPU build of torch has no
NVTX binding (`torch._C._nvtx`), so the process installs a recorder in its place: torch.cuda.nvtx's
own `range_push` / `range_pop` call it, and what it records is what a CUDA build would emit."""
import json

from hidden_packages import run_without

RECORD_TORCH_NVTX = """
import json
import torch

calls = []


class Recorder:  # the binding's two entry points that range_push / range_pop call
    def rangePushA(self, message):
        calls.append(["push", message])
        return len(calls)

    def rangePop(self):
        calls.append(["pop"])
        return 0


torch._C._nvtx = Recorder()
import torch.cuda.nvtx  # noqa: E402
torch.cuda.nvtx._nvtx = torch._C._nvtx  # bound at its import, which may have come first

from noprop_fast import nvtx_ranges  # noqa: E402
from noprop_fast.nvtx_ranges import phase, phase_iter, set_enabled  # noqa: E402
"""

FALLBACK = RECORD_TORCH_NVTX + """
assert nvtx_ranges.nvtx is None and nvtx_ranges.BACKEND == "torch.cuda.nvtx", nvtx_ranges.BACKEND
assert nvtx_ranges.enabled_by_environment({"NOPROP_FAST_NVTX": "1"})
assert not nvtx_ranges.is_enabled()  # no profiler's variables in this process
with phase("forward"):
    pass
assert calls == []  # off: nothing reaches torch either
set_enabled(True)
with phase("loss"):
    with phase("noise"):
        pass
try:
    with phase("forward"):
        raise ValueError("propagates")
except ValueError:
    pass
assert list(phase_iter("data", [7])) == [7]
ranges = list(calls)

# a training step of the engine opens its phases through the fallback too
calls.clear()
from noprop_fast.config import ImageConfig  # noqa: E402
from noprop_fast.data import load_image_dataset  # noqa: E402
from noprop_fast.optim import make_optimizer  # noqa: E402
from noprop_fast.schedule import NoiseSchedule  # noqa: E402
from noprop_fast.tasks.image import build_model, train_step  # noqa: E402
torch.manual_seed(0)
cfg = ImageConfig(num_blocks=2, batch_size=8, dataset="digits")
data = load_image_dataset("digits")
model = build_model(cfg, data, torch.device("cpu"))
schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta)
train_step(model, make_optimizer(model, cfg), schedule, data.train_x[:8], data.train_y[:8])
print(json.dumps({"ranges": ranges, "step": calls}))
"""


def top_level(calls) -> list[str]:
    """Names of the outermost ranges, after checking that every push has its pop."""
    depth, names = 0, []
    for call in calls:
        if call[0] == "push":
            names += [call[1]] if depth == 0 else []
            depth += 1
        else:
            depth -= 1
            assert depth >= 0, calls
    assert depth == 0, calls
    return names


def test_without_the_package_ranges_go_through_torch_cuda_nvtx():
    result = run_without({"nvtx"}, FALLBACK)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ranges"] == [["push", "loss"], ["push", "noise"], ["pop"], ["pop"],
                             ["push", "forward"], ["pop"],
                             ["push", "data"], ["pop"], ["push", "data"], ["pop"]]
    assert top_level(out["step"]) == ["forward", "noise", "forward", "loss", "backward", "optimizer"]


NEITHER = """
import torch
if hasattr(torch._C, "_nvtx"):  # a CUDA build: take its binding away too
    del torch._C._nvtx
from noprop_fast import nvtx_ranges
from noprop_fast.nvtx_ranges import phase, set_enabled
assert nvtx_ranges.BACKEND is None and not nvtx_ranges.is_enabled()
assert not nvtx_ranges.enabled_by_environment({"NOPROP_FAST_NVTX": "1"})
with phase("forward"):
    pass
try:
    set_enabled(True)
except RuntimeError as err:
    print(err)
else:
    raise AssertionError("set_enabled(True) without any NVTX library")
"""


def test_without_any_nvtx_library_the_ranges_stay_off():
    result = run_without({"nvtx"}, NEITHER, NOPROP_FAST_NVTX="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "need the nvtx package" in result.stdout
