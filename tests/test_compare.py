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
from noprop_fast.config import LMConfig, resolve
from noprop_fast.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for subprocesses
TINY = ["--epochs", "2", "--num-blocks", "2", "--batch-size", "256", "--device", "cpu",
        "--block-schedule", "sequential"]
METHODS = ("noprop", "backprop")
PLOTS = ("loss.png", "accuracy.png", "time.png", "memory.png")

SLOW = pytest.mark.slow  # the tests of the one real comparison (the fake-run tests below are fast)


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


@SLOW
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


@SLOW
def test_plots_are_nontrivial_pngs(cli_out):
    for name in PLOTS:
        data = (cli_out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, f"{name}: only {len(data)} bytes"


@SLOW
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


@SLOW
def test_both_runs_saw_the_same_data(cli_out):
    runs = json.loads((cli_out / "summary.json").read_text())["runs"]
    assert runs["noprop"]["data_source"] == runs["backprop"]["data_source"]
    assert runs["noprop"]["dataset"] == runs["backprop"]["dataset"] == "digits"


@SLOW
def test_sequential_noprop_saves_less_for_backward_than_backprop(cli_out):
    runs = json.loads((cli_out / "summary.json").read_text())["runs"]
    noprop, backprop = runs["noprop"], runs["backprop"]
    assert noprop["block_schedule"] == "sequential"
    assert noprop["memory_kind"] == backprop["memory_kind"] == "cpu_saved_for_backward"
    # one block's graph against the whole chain's: T=2 already shows it
    assert 0 < noprop["peak_memory_bytes"] < backprop["peak_memory_bytes"], (
        noprop["peak_memory_bytes"], backprop["peak_memory_bytes"])


@SLOW
def test_existing_run_folder_is_refused(cli_out):
    cfg = resolve(None, {"epochs": 1, "num_blocks": 2, "device": "cpu"})
    with pytest.raises(UserError, match="already holds a run"):
        compare(cfg, ["noprop"], cli_out)  # its metrics.jsonl would mix two runs


@SLOW
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


# -- four image methods: --methods, and the report and charts of fake runs (no training) ----------
from noprop_fast import plots, reports  # noqa: E402
from noprop_fast.compare import (DEFAULT_METHODS, TASK_METHODS, parse_args,  # noqa: E402
                                 parse_methods)

FOUR = ("noprop", "noprop-ct", "noprop-fm", "backprop")
RUN = {"task": "image", "dataset": "mnist", "device": "cpu (1 threads)", "inference": "stochastic",
       "memory_kind": "cpu_saved_for_backward", "data_source": "hub", "block_schedule": None}
# what each method's summary adds; CT and FM carry their prediction's steps and time
FAKE = {
    "noprop": {"block_schedule": "sequential", "test_accuracy": 0.9912,
               "seconds_per_epoch": 3.0, "peak_memory_bytes": 5 * 2**20},
    "noprop-ct": {"test_accuracy": 0.9784, "seconds_per_epoch": 2.0,
                  "peak_memory_bytes": 10 * 2**20, "inference_steps": 1000,
                  "eval_seconds_per_1000": 2.5},
    "noprop-fm": {"test_accuracy": 0.9921, "seconds_per_epoch": 2.2,
                  "peak_memory_bytes": 15 * 2**20, "inference_steps": 100, "ode_solver": "heun",
                  "eval_seconds_per_1000": 0.75},
    "backprop": {"test_accuracy": 0.9946, "seconds_per_epoch": 4.0,
                 "peak_memory_bytes": 20 * 2**20},
}


def fake_runs(methods, strip=()) -> tuple[dict, dict]:
    """Summaries and three epochs of history per method; `strip`: summary keys to leave out."""
    runs = {m: {k: v for k, v in {**RUN, "method": m, **FAKE[m]}.items() if k not in strip}
            for m in methods}
    history = {m: [{"epoch": e, "train_loss": (i + 1) / e, "test_accuracy": 0.5 + e / 10}
                   for e in (1, 2, 3)] for i, m in enumerate(methods)}
    return runs, history


def write_fake_report(tmp_path, methods, strip=(), **fields) -> str:
    cfg = resolve(None, {"dataset": "mnist", "num_blocks": "10", "epochs": "3", **fields})
    runs, history = fake_runs(methods, strip)
    tmp_path.mkdir(exist_ok=True)
    path = reports.write_report(cfg, None, runs, history, tmp_path, "mnist-fake", "python -m x")
    return path.read_text()


def rows_of(report: str, first_cell: str) -> list[list[str]]:
    """The table rows whose first cell starts with `first_cell`, as lists of cells."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")]
             for line in report.splitlines() if line.startswith("|")]
    return [row for row in cells if row[0].startswith(first_cell)]


def test_methods_accepts_the_four_image_methods_in_the_order_given():
    assert parse_methods("noprop,noprop-ct,noprop-fm,backprop") == list(FOUR)
    assert parse_methods(" noprop-fm , noprop-ct ") == ["noprop-fm", "noprop-ct"]
    assert parse_methods("noprop-ct") == ["noprop-ct"]
    assert parse_args([]).methods == ",".join(DEFAULT_METHODS) == "noprop,backprop"
    assert TASK_METHODS["image"] == FOUR and TASK_METHODS["lm"] == ("noprop", "backprop")
    assert parse_methods("backprop,noprop", "lm") == ["backprop", "noprop"]


@pytest.mark.parametrize("text, task, message", [
    ("noprop,noprop-ct,noprop", "image", "must name distinct methods"),
    ("noprop-fm,noprop-fm", "image", "must name distinct methods"),
    ("noprop,noprop-dt", "image", "from noprop,noprop-ct,noprop-fm,backprop"),
    ("", "image", "must name distinct methods"),
    ("noprop,noprop-ct", "lm", "noprop-ct is image-only; --task lm compares noprop,backprop"),
    ("noprop-ct,noprop-fm", "lm", "noprop-ct,noprop-fm are image-only"),
    ("noprop,sgd", "lm", "from noprop,backprop"),
])
def test_bad_methods_are_refused_in_one_line(text, task, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        parse_methods(text, task)
    assert "\n" not in str(err.value)


def test_lm_refuses_ct_and_fm_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--task", "lm", "--methods", "noprop,noprop-fm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --methods: noprop-fm is image-only; --task lm compares "
                   "noprop,backprop\n")
    assert not out.exists()
    cfg = resolve(None, {}, cls=LMConfig)
    with pytest.raises(UserError, match="image-only"):
        compare(cfg, ["noprop-ct"], out)  # the library call checks too
    assert not out.exists()


def test_every_method_has_a_name_and_a_loss_name():
    names = [reports.display_name(m) for m in FOUR]
    assert names == ["NoProp-DT", "NoProp-CT", "NoProp-FM", "backprop"]
    assert reports.display_name("noprop", "lm") == "NoProp-LM"
    for task, methods in TASK_METHODS.items():
        for m in methods:
            assert (task, m) in plots.LOSS_NAMES


def test_four_method_report_has_a_row_per_method_and_says_how_each_predicts(tmp_path):
    report = write_fake_report(tmp_path, FOUR, block_schedule="sequential")
    assert report.startswith("# NoProp-DT vs NoProp-CT vs NoProp-FM vs backprop on mnist\n")
    assert "block schedule sequential (NoProp-DT)" in report and "T=10" in report
    assert ("the Eq. 3 chain (NoProp-DT and NoProp-CT) uses stochastic inference. With the "
            "sequential block schedule an epoch of NoProp-DT is T passes.") in report
    rows = {row[0]: row for row in rows_of(report, "noprop") + rows_of(report, "backprop")
            if len(row) == 6}
    assert list(rows) == ["noprop (sequential)", "noprop-ct (1000 steps)",
                          "noprop-fm (100 heun steps)", "backprop"]
    assert [rows[k][1] for k in rows] == ["99.12", "97.84", "99.21", "99.46"]
    assert [rows[k][3] for k in rows] == ["5.0", "10.0", "15.0", "20.0"]  # MiB
    assert [rows[k][5] for k in rows] == ["0.25", "0.50", "0.75", "1.00"]  # memory / backprop
    methods = report.split("## What each method trains on and how it predicts")[1]
    methods = methods.split("## Per epoch")[0]
    bullets = [line for line in methods.splitlines() if line.startswith("- ")]
    assert [b.split(":")[0] for b in bullets] == [
        "- noprop (NoProp-DT)", "- noprop-ct (NoProp-CT)", "- noprop-fm (NoProp-FM)",
        "- backprop"]
    dt, ct, fm, bp = bullets
    assert "T = 10 blocks" in dt and "Eq. 3 chain through the T blocks" in dt
    assert "SNR'(t)" in ct and "KL" in ct and "one network" in ct
    assert "Eq. 3 chain" in ct and "(1000 steps)" in ct and "classifier on z_1" in ct
    assert "2.50 s per 1000 test images" in ct
    assert "vector field" in fm and "anchor cross-entropy" in fm and "(100 heun steps)" in fm
    assert "nearest to z_1" in fm and "0.75 s per 1000 test images" in fm
    assert "end to end" in bp and "per 1000 test images" not in bp + dt
    epoch_rows = [line for line in report.splitlines() if re.match(r"\| [123] \|", line)]
    assert len(epoch_rows) == 3 and all(line.count("|") == 10 for line in epoch_rows)
    header = next(line for line in report.splitlines() if line.startswith("| epoch |"))
    assert all(f"{m} loss" in header and f"{m} acc (%)" in header for m in FOUR)
    assert "Each method's run: noprop/, noprop-ct/, noprop-fm/, backprop/." in report
    for name in ("loss.png", "accuracy.png", "time.png", "memory.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_subsets_name_only_the_methods_run_and_tolerate_missing_fields(tmp_path):
    strip = ("inference_steps", "ode_solver", "eval_seconds_per_1000")
    report = write_fake_report(tmp_path, ("noprop-fm", "noprop-ct"), strip)
    assert report.startswith("# NoProp-FM vs NoProp-CT on mnist\n")
    config_line = next(line for line in report.splitlines() if line.startswith("- config:"))
    assert "T=" not in config_line and "block schedule" not in config_line
    assert "NoProp-DT" not in report and "- backprop" not in report
    assert "noprop (" not in report and "| backprop |" not in report
    assert ("Test accuracy is measured after the last epoch; the Eq. 3 chain (NoProp-CT) uses "
            "stochastic inference.") in report
    rows = [row for row in rows_of(report, "noprop-") if len(row) == 6]
    assert [row[0].split(" ")[0] for row in rows] == ["noprop-fm", "noprop-ct"]
    assert all(row[5] == "-" for row in rows)  # no backprop run: no memory ratio
    assert "per 1000 test images" not in report
    report = write_fake_report(tmp_path / "b", ("noprop-ct", "backprop"))
    assert report.startswith("# NoProp-CT vs backprop on mnist\n")
    assert "T=10" in report and "block schedule" not in report
    report = write_fake_report(tmp_path / "c", ("noprop-fm", "backprop"), inference="noise-free")
    assert "Test accuracy is measured after the last epoch.\n" in report  # no Eq. 3 chain run


def test_four_method_charts_name_the_methods_and_keep_labels_inside(tmp_path, monkeypatch):
    plt = plots.pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    reports.write_plots(*fake_runs(FOUR), tmp_path)
    assert len(figures) == 4  # loss, accuracy, time, memory
    loss, _, time_chart, memory = figures
    legend = [t.get_text() for t in loss.axes[0].get_legend().get_texts()]
    assert legend == ["NoProp-DT", "NoProp-CT", "NoProp-FM", "backprop"]
    bars = [t.get_text() for t in memory.axes[0].get_xticklabels()]
    assert bars == legend
    captions = [t.get_text() for t in memory.axes[0].texts]
    assert captions == ["5.0 MiB\n0.25 x backprop", "10.0 MiB\n0.50 x backprop",
                        "15.0 MiB\n0.75 x backprop", "20.0 MiB\n1.00 x backprop"]
    for i, fig in enumerate(figures):
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        # the bar charts' method names too (a line chart lists ticks outside its view)
        ticks = ax.get_xticklabels() if i >= 2 else []
        texts = [ax.yaxis.label, ax.xaxis.label, ax.title, *ax.texts, *ticks]
        for text in texts + list(fig.texts):
            if text.get_text():
                box = text.get_window_extent(renderer)
                assert box.x0 >= 0 and box.y0 >= 0, text.get_text()
                assert box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, text.get_text()
    # neighbouring captions on the memory chart do not overlap
    renderer = memory.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in memory.axes[0].texts]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_one_network_methods_take_the_all_schedule_and_bad_pairs_fail_before_any_work(tmp_path):
    from noprop_fast.compare import run_config
    cfg = resolve(None, {"block_schedule": "sequential", "inference_steps": "7"})
    configs = {m: run_config(cfg, m, tmp_path) for m in FOUR}
    assert {m: c.block_schedule for m, c in configs.items()} == {
        "noprop": "sequential", "noprop-ct": "all", "noprop-fm": "all", "backprop": "sequential"}
    assert all(c.out == str(tmp_path / m) and c.method == m for m, c in configs.items())
    # valid for NoProp-DT, not for NoProp-FM: refused before the data loads or a folder exists
    cfg = resolve(None, {"fm_readout": "classifier", "embedding": "onehot"})
    out = tmp_path / "out"
    with pytest.raises(UserError, match="fm_readout"):
        compare(cfg, ["noprop", "noprop-fm"], out)
    assert not out.exists()


def test_fm_read_out_by_the_classifier_says_so(tmp_path):
    report = write_fake_report(tmp_path, ("noprop-fm",), embedding="learned",
                               fm_readout="classifier")
    fm = next(line for line in report.splitlines() if line.startswith("- noprop-fm"))
    assert fm.endswith("then the classifier on z_1. Prediction: 0.75 s per 1000 test images.")
    assert "nearest" not in fm
