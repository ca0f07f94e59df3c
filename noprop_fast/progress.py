"""The progress line's estimate of the time left (docs/usage.md, "Plots and the progress line"):
tqdm's smoothed rate counts an evaluation as one very slow step, so `RunClock` keeps the two apart.
`progress_bar`'s `update(n)` tells the clock that n steps finished; the trainer calls `pause()`
before an evaluation and `resume()` after it."""
import time

from tqdm import tqdm

_now = time.perf_counter  # the clock a RunClock reads unless given one (tests replace it)


def evaluations_between(done: int, total: int, every: int) -> int:
    """How many of the units (epochs, steps) done+1..total end with an evaluation: every `every`-th,
    and always the last."""
    if total <= done:
        return 0
    return total // every - done // every + (1 if total % every else 0)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunClock:
    """Training and evaluation time of a run, kept apart; `clock` is injectable for tests."""

    def __init__(self, steps_left: int, evals_left: int, clock=None):
        clock = _now if clock is None else clock
        self.steps_left, self.evals_left, self.clock = steps_left, evals_left, clock
        self.train_seconds, self.steps = 0.0, 0
        self.eval_seconds, self.evals = 0.0, 0
        self._mark, self._paused_at = clock(), None

    def trained(self, steps: int) -> None:
        """`steps` more steps finished: the time since the last mark was training."""
        now = self.clock()
        if self._paused_at is None:
            self.train_seconds += now - self._mark
        self.steps += steps
        self.steps_left = max(self.steps_left - steps, 0)
        self._mark = now

    def pause(self) -> None:
        """Training stops here (an evaluation, a checkpoint follows)."""
        self._paused_at = self.clock()

    def resume(self, evaluated: bool = True) -> None:
        """Training goes on; the time since `pause` was an evaluation (counted as one), or other
        work between epochs (left out of both estimates)."""
        now = self.clock()
        if self._paused_at is not None and evaluated:
            self.eval_seconds += now - self._paused_at
            self.evals += 1
            self.evals_left = max(self.evals_left - 1, 0)
        self._paused_at, self._mark = None, now

    def train_left(self) -> float | None:
        """Seconds of training left; None before the first measured step."""
        if self.steps == 0:
            return None
        return self.steps_left * self.train_seconds / self.steps

    def eval_left(self) -> float | None:
        """Seconds of evaluation left; None before the first evaluation (unless none is left)."""
        if self.evals_left == 0:
            return 0.0
        if self.evals == 0:
            return None
        return self.evals_left * self.eval_seconds / self.evals

    def text(self) -> str:
        """'run 4m10s left + 20s eval' (evaluations' time apart); '?' before any step."""
        train, evals = self.train_left(), self.eval_left()
        text = "run ? left" if train is None else f"run {format_seconds(train)} left"
        if evals is None:
            return text + " + evals"
        return text + (f" + {format_seconds(evals)} eval" if evals > 0 else "")


class _ClockedBar(tqdm):
    """tqdm whose time estimate is a RunClock's (its own rate and estimate are left out)."""

    def __init__(self, *args, clock: RunClock, **kwargs):
        self.run_clock = clock
        super().__init__(*args, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}, {run_left}{postfix}]", **kwargs)

    def update(self, n=1):
        self.run_clock.trained(n)
        return super().update(n)

    @property
    def format_dict(self):
        return {**super().format_dict, "run_left": self.run_clock.text()}


def progress_bar(clock: RunClock | None, **kwargs) -> tqdm:
    """A tqdm progress line; with a clock, its estimate is the clock's (evaluations apart)."""
    return tqdm(**kwargs) if clock is None else _ClockedBar(clock=clock, **kwargs)
