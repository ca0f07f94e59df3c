"""`python -m noprop_fast.compare`: report, summary, plots, shared data, memory figure, CLI errors.

One comparison, run once per module through the CLI's `main`, serves every test: digits with a tiny
config (T=2, 2 epochs, batch 256) on the CPU, so the memory figure is the bytes saved for backward,
and NoProp with the sequential block schedule (one block's graph in memory at a time), so its
figure must come out below backprop's.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from noprop_fast.compare import compare, main
from noprop_fast.config import resolve
from noprop_fast.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for subprocesses
TINY = ["--epochs", "2", "--num-blocks", "2", "--batch-size", "256", "--device", "cpu",
        "--block-schedule", "sequential"]
METHODS = ("noprop", "backprop")
PLOTS = ("loss.png", "accuracy.png", "time.png", "memory.png")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    assert main([*TINY, "--no-progress", "--out", str(out)]) == 0
    return out


def result_rows(report: str) -> dict[str, list[str]]:
    """The results table's rows, method -> cells (the per-epoch table starts with a number)."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].split(" ")[0]
        if line.startswith("|") and name in METHODS:
            rows[name] = cells
    return rows


def test_report_has_a_row_per_method_with_accuracy_memory_and_command(cli_out):
    report = (cli_out / "report.md").read_text()
    rows = result_rows(report)
    assert set(rows) == set(METHODS)
    for cells in rows.values():
        method, acc, sec_per_epoch, mib, kind, ratio = cells
        assert 0.0 <= float(acc) <= 100.0
        assert float(sec_per_epoch) > 0
        assert float(mib) > 0
        assert "saved for backward" in kind
    assert float(rows["backprop"][5]) == pytest.approx(1.0)
    assert f"`python -m noprop_fast.compare {' '.join(TINY)} --no-progress --out {cli_out}`" in report
    assert "stochastic inference" in report
    assert "digits" in report and "cpu" in report
    epoch_rows = [line for line in report.splitlines() if re.match(r"\| [12] \|", line)]
    assert len(epoch_rows) == 2


def test_plots_are_nontrivial_pngs(cli_out):
    for name in PLOTS:
        data = (cli_out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, f"{name}: only {len(data)} bytes"


def test_summary_has_both_runs(cli_out):
    summary = json.loads((cli_out / "summary.json").read_text())
    assert set(summary["runs"]) == set(METHODS)
    assert summary["config"]["epochs"] == 2 and summary["config"]["num_blocks"] == 2
    for method, run in summary["runs"].items():
        assert run["method"] == method
        assert run["epochs"] == 2
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["run_dir"] == str(cli_out / method)
        assert (cli_out / method / "summary.json").is_file()
        assert [r["epoch"] for r in summary["history"][method]] == [1, 2]


def test_both_runs_saw_the_same_data(cli_out):
    runs = json.loads((cli_out / "summary.json").read_text())["runs"]
    assert runs["noprop"]["data_source"] == runs["backprop"]["data_source"]
    assert runs["noprop"]["dataset"] == runs["backprop"]["dataset"] == "digits"


def test_sequential_noprop_saves_less_for_backward_than_backprop(cli_out):
    runs = json.loads((cli_out / "summary.json").read_text())["runs"]
    noprop, backprop = runs["noprop"], runs["backprop"]
    assert noprop["block_schedule"] == "sequential"
    assert noprop["memory_kind"] == backprop["memory_kind"] == "cpu_saved_for_backward"
    # one block's graph against the whole chain's: T=2 already shows it
    assert 0 < noprop["peak_memory_bytes"] < backprop["peak_memory_bytes"], (
        noprop["peak_memory_bytes"], backprop["peak_memory_bytes"])


def test_existing_run_folder_is_refused(cli_out):
    cfg = resolve(None, {"epochs": 1, "num_blocks": 2, "device": "cpu"})
    with pytest.raises(UserError, match="already holds a run"):
        compare(cfg, ["noprop"], cli_out)  # its metrics.jsonl would mix two runs


@pytest.mark.parametrize("bad", [
    ["--method-that-does-not-exist"],
    ["--epochs", "0"],
    ["--methods", "noprop,sgd"],
    ["--method", "backprop"],
])
def test_bad_override_is_one_line_and_nonzero(tmp_path, bad):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "noprop_fast.compare", *bad, "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not out.exists()
