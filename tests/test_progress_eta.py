"""The progress line's time estimate leaves evaluations out of the training rate (progress.py):
the estimate with a fake clock, and both trainers' progress lines after an hour-long evaluation."""
import re

import pytest

from noprop_fast import progress
from noprop_fast.config import LMConfig, resolve
from noprop_fast.progress import RunClock, evaluations_between, format_seconds


class FakeClock:
    """Seconds that move only when told to (`tick` on every read, if set)."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_estimate_is_training_time_only_with_evaluations_apart():
    clock = FakeClock()
    eta = RunClock(steps_left=100, evals_left=4, clock=clock)
    assert eta.train_left() is None and eta.text() == "run ? left + evals"
    for _ in range(10):
        clock.now += 2.0          # a step takes 2 s
        eta.trained(1)
    assert eta.train_left() == pytest.approx(90 * 2.0)
    eta.pause()
    clock.now += 3600.0           # an evaluation and its checkpoint take an hour
    eta.resume()
    assert eta.train_left() == pytest.approx(90 * 2.0)       # unchanged by the hour
    assert eta.eval_left() == pytest.approx(3 * 3600.0)
    clock.now += 4.0              # the next step is slower: the mean moves, smoothly
    eta.trained(1)
    assert eta.train_left() == pytest.approx(89 * 24.0 / 11)
    assert eta.text() == f"run {format_seconds(89 * 24.0 / 11)} left + 3h00m eval"


def test_time_between_epochs_without_evaluation_counts_nowhere():
    clock = FakeClock()
    eta = RunClock(steps_left=4, evals_left=1, clock=clock)
    clock.now += 1.0
    eta.trained(2)
    eta.pause()
    clock.now += 50.0             # a checkpoint, no evaluation
    eta.resume(evaluated=False)
    assert eta.train_left() == pytest.approx(1.0) and eta.eval_left() is None
    clock.now += 1.0
    eta.trained(2)
    assert eta.train_left() == 0.0 and eta.text() == "run 0s left + evals"


@pytest.mark.parametrize("done,total,every,expected", [
    (0, 10, 5, 2), (0, 10, 3, 4), (3, 10, 3, 3), (10, 10, 3, 0), (0, 1, 200, 1), (0, 800, 200, 4),
    (400, 800, 200, 2), (7, 8, 1, 1)])
def test_evaluations_between_counts_every_nth_and_the_last(done, total, every, expected):
    assert evaluations_between(done, total, every) == expected
    brute = sum(1 for u in range(done + 1, total + 1) if u % every == 0 or u == total)
    assert brute == expected


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3599, "59m59s"),
                                          (3600, "1h00m"), (7322, "2h02m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def estimates(stderr: str) -> list[tuple[float, str]]:
    """(training seconds left, the rest) of every rendering of the progress line."""
    found = []
    for train, rest in re.findall(r"run (\d\S*) left([^,\]]*)", stderr):  # not "?": unmeasured
        parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", train)
        h, m, s = (int(p or 0) for p in parts.groups())
        found.append((3600 * h + 60 * m + s, rest))
    return found


@pytest.fixture
def slow_evaluations(monkeypatch):
    """Every read of the progress clock is one second later; every evaluation an hour."""
    clock = FakeClock(tick=1.0)
    monkeypatch.setattr(progress, "_now", clock)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # render on every update

    def slow(evaluate):
        def wrapped(self):
            clock.now += 3600.0
            return evaluate(self)
        return wrapped
    return slow


def test_lm_progress_line_ignores_an_hour_of_evaluation(data_dir, tmp_path, capsys, monkeypatch,
                                                        slow_evaluations):
    from noprop_fast.data.corpus import load_token_data
    from noprop_fast.loop import Run
    monkeypatch.setattr(Run, "evaluate", slow_evaluations(Run.evaluate))
    cfg = resolve(None, {"width": 32, "heads": 2, "embed_dim": 8, "num_blocks": 2, "seq_len": 16,
                         "batch_size": 4, "eval_tokens": 64, "eval_chains": 1, "max_steps": 8,
                         "eval_every": 4, "sample_tokens": 0, "device": "cpu",
                         "data_dir": str(data_dir)}, cls=LMConfig)
    Run(cfg, load_token_data(cfg.data_dir), tmp_path / "lm", show_progress=True).fit()
    shown = estimates(capsys.readouterr().err)
    assert len(shown) >= 8
    after = [e for e in shown if "eval" in e[1] and "evals" not in e[1]]  # once an eval is timed
    assert after, shown
    for seconds, rest in after:
        assert seconds <= 4 and "1h00m eval" in rest, shown  # 4 steps of ~1 s left at most


def test_image_progress_line_ignores_an_hour_of_evaluation(tmp_path, capsys, monkeypatch,
                                                           slow_evaluations):
    from noprop_fast.data import load_image_dataset
    from noprop_fast.loop import Run
    monkeypatch.setattr(Run, "evaluate", slow_evaluations(Run.evaluate))
    cfg = resolve(None, {"num_blocks": 2, "batch_size": 512, "epochs": 3, "device": "cpu"})
    Run(cfg, load_image_dataset("digits"), tmp_path / "img", show_progress=True).fit()
    shown = estimates(capsys.readouterr().err)
    after = [e for e in shown if "eval" in e[1] and "evals" not in e[1]]
    assert after, shown
    for seconds, rest in after:
        # 3 epochs of 3 steps of ~1 s: at most 6 steps left once the first evaluation is timed
        assert seconds <= 6 and "h00m eval" in rest, shown


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from helpers import text_shards
    return text_shards(tmp_path_factory.mktemp("shards"),
                       "an evaluation is not a training step. " * 80)
