"""NVTX phase ranges: off, they never reach the nvtx library; on, one range per use with the right
name and domain, closed also when the body raises; the enabling rule; and the phases a training
step of each task opens, in order, with the nvtx calls recorded instead of sent to a profiler."""
import numpy as np
import pytest
import torch

# installed with the project; a machine without it: tests/test_nvtx_fallback.py
nvtx = pytest.importorskip("nvtx", reason="the nvtx package is not installed")

from noprop_fast import nvtx_ranges  # noqa: E402
from noprop_fast.config import ImageConfig, LMConfig  # noqa: E402
from noprop_fast.data import load_image_dataset  # noqa: E402
from noprop_fast.data.shards import TokenData  # noqa: E402
from noprop_fast.loop import Run  # noqa: E402
from noprop_fast.nvtx_ranges import phase, phase_iter, set_enabled  # noqa: E402
from noprop_fast.optim import make_optimizer  # noqa: E402
from noprop_fast.schedule import NoiseSchedule  # noqa: E402
from noprop_fast.tasks.image import build_model, train_step  # noqa: E402


@pytest.fixture(autouse=True)
def restore_state():
    """Each test leaves the module as it found it (on or off) and torch at one thread."""
    was, threads = nvtx_ranges.is_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    set_enabled(was)
    torch.set_num_threads(threads)


@pytest.fixture
def recorded(monkeypatch):
    """Turn the ranges on with nvtx's push/pop replaced by a recorder: [("push", message, domain)
    or ("pop", None, domain)] in call order."""
    calls = []
    monkeypatch.setattr(nvtx, "push_range",
                        lambda message=None, color=None, domain=None, **kw:
                        calls.append(("push", message, domain)))
    monkeypatch.setattr(nvtx, "pop_range", lambda domain=None: calls.append(("pop", None, domain)))
    set_enabled(True)
    return calls


def top_level_phases(calls) -> list[str]:
    """The phase names of the outermost ranges, after checking that pushes and pops pair up."""
    depth, names = 0, []
    for kind, message, domain in calls:
        assert domain == "noprop_fast"
        if kind == "push":
            if depth == 0:
                names.append(message)
            depth += 1
        else:
            depth -= 1
            assert depth >= 0, "a pop without a push"
    assert depth == 0, "a range left open"
    return names


def test_disabled_phase_never_calls_nvtx(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("nvtx called while disabled")
    for name in ("push_range", "pop_range", "annotate", "start_range", "end_range", "mark"):
        monkeypatch.setattr(nvtx, name, forbidden)
    set_enabled(False)
    ran = []
    for name in nvtx_ranges.PHASES:
        with phase(name):
            ran.append(name)
    assert ran == list(nvtx_ranges.PHASES)
    assert phase("data") is phase("loss")  # one shared object: nothing allocated per use
    batches = [1, 2, 3]
    assert phase_iter("data", batches) is batches
    with pytest.raises(ValueError), phase("forward"):
        raise ValueError("propagates")


def test_unknown_phase_is_an_error_on_and_off(recorded):
    for on in (True, False):
        set_enabled(on)
        with pytest.raises(KeyError):
            phase("forwards")
    assert recorded == []


def test_enabled_phase_opens_and_closes_one_named_range(recorded):
    with phase("forward"):
        assert recorded == [("push", "forward", "noprop_fast")]
    with pytest.raises(RuntimeError, match="boom"), phase("loss"):
        raise RuntimeError("boom")
    assert recorded == [("push", "forward", "noprop_fast"), ("pop", None, "noprop_fast"),
                        ("push", "loss", "noprop_fast"), ("pop", None, "noprop_fast")]


def test_nested_and_iterated_ranges_pair_up(recorded):
    with phase("loss"):
        with phase("noise"):
            pass
    assert list(phase_iter("data", iter([7, 8]))) == [7, 8]
    # two items and the final, exhausted fetch: three data ranges
    assert top_level_phases(recorded) == ["loss", "data", "data", "data"]
    assert recorded[1] == ("push", "noise", "noprop_fast")


def test_replay_is_a_reserved_phase_with_its_own_colour():
    assert "replay" in nvtx_ranges.PHASES
    colours = list(nvtx_ranges.PHASES.values())
    assert len(set(colours)) == len(colours)


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"NSYS_PROFILING_SESSION_ID": "3"}, True),
    ({"NVTX_INJECTION64_PATH": "/opt/nsight/libToolsInjection64.so"}, True),
    ({"NOPROP_FAST_NVTX": "1"}, True),
    ({"NOPROP_FAST_NVTX": "0", "NSYS_PROFILING_SESSION_ID": "3"}, False),
    ({"NOPROP_FAST_NVTX": "1", "NSYS_PROFILING_SESSION_ID": ""}, True),
    ({"NSYS_PROFILING_SESSION_ID": ""}, False),
])
def test_environment_rule(environ, expected):
    assert nvtx_ranges.enabled_by_environment(environ, nvtx_available=True) is expected
    assert nvtx_ranges.enabled_by_environment(environ, nvtx_available=False) is False


@pytest.mark.parametrize("method, expected", [
    # the CE's draw of z_T is a noise range nested inside the loss range
    ("noprop", ["forward", "noise", "forward", "loss", "backward", "optimizer"]),
    ("backprop", ["forward", "loss", "backward", "optimizer"]),
])
def test_image_train_step_phases(recorded, method, expected):
    cfg = ImageConfig(num_blocks=2, batch_size=8, dataset="digits", method=method)
    data = load_image_dataset("digits")
    model = build_model(cfg, data, torch.device("cpu"))
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta)
    train_step(model, make_optimizer(model, cfg), schedule, data.train_x[:8], data.train_y[:8])
    assert top_level_phases(recorded) == expected
    if method == "noprop":
        assert ("push", "noise", "noprop_fast") in recorded[recorded.index(
            ("push", "loss", "noprop_fast")):]


@pytest.mark.parametrize("method, expected", [
    ("noprop", ["data", "forward", "noise", "forward", "loss", "backward", "optimizer"]),
    ("backprop", ["data", "forward", "loss", "backward", "optimizer"]),
])
def test_lm_step_and_evaluation_phases(recorded, tmp_path, method, expected):
    vocab = 23
    tokens = np.random.default_rng(0).integers(0, vocab, 400).astype(np.uint16)
    data = TokenData(train=[tokens], val=[tokens[:100]], tokenizer="byte", vocab_size=vocab,
                     source="test tokens")
    cfg = LMConfig(method=method, num_blocks=2, width=16, heads=2, embed_dim=8, seq_len=8,
                   batch_size=2, eval_tokens=32, eval_chains=1, device="cpu")
    trainer = Run(cfg, data, tmp_path, show_progress=False)
    trainer.step(*next(phase_iter("data", trainer.task.round(trainer.progress, None)[1])))
    assert top_level_phases(recorded) == expected
    recorded.clear()
    trainer.evaluate()
    assert top_level_phases(recorded) == ["evaluation"]


def test_image_epoch_fetches_batches_in_data_ranges(recorded, tmp_path):
    cfg = ImageConfig(num_blocks=2, batch_size=512, dataset="digits", device="cpu")
    trainer = Run(cfg, load_image_dataset("digits"), tmp_path, show_progress=False)
    trainer.train_round()
    phases = top_level_phases(recorded)
    steps = phases.count("optimizer")
    assert steps == -(-trainer.data.train_x.shape[0] // 512)
    # each step: its batch fetch, then its own phases; one last fetch finds the epoch's end
    one_step = ["data", "forward", "noise", "forward", "loss", "backward", "optimizer"]
    assert phases == one_step * steps + ["data"]
    recorded.clear()
    trainer.evaluate()
    assert top_level_phases(recorded) == ["evaluation"]
