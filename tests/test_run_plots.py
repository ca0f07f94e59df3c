"""The pictures: a run's folder gets its curves as PNGs (image and language task, and again on
resume); a plot that cannot be drawn never fails the run; compare's memory chart keeps its labels
inside the figure and says where NoProp's memory saving comes from."""
import sys

import pytest
from PIL import Image

from noprop_fast import plots, reports
from noprop_fast.train import main

IMAGE = ["--num-blocks", "2", "--batch-size", "256", "--no-progress", "--device", "cpu"]
LM = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "2",
      "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
      "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--eval-every", "2"]
IMAGE_PLOTS, LM_PLOTS = ("loss.png", "accuracy.png"), ("train_loss.png", "val_loss.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from helpers import text_shards
    text = "the blocks denoise a label; the classifier reads the last one. " * 60
    return text_shards(tmp_path_factory.mktemp("shards"), text)


def assert_pngs(run_dir, names):
    for name in names:
        path = run_dir / name
        assert path.is_file(), f"{name} missing from {sorted(p.name for p in run_dir.iterdir())}"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200, name
            image.verify()  # a truncated or corrupt file raises here


def test_image_run_writes_its_curves_and_rewrites_them_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "img"
    assert main([*IMAGE, "--epochs", "1", "--out", str(run_dir)]) == 0
    assert_pngs(run_dir, IMAGE_PLOTS)
    assert f"plots: {run_dir / 'loss.png'}, {run_dir / 'accuracy.png'}" in capsys.readouterr().out
    for name in IMAGE_PLOTS:
        (run_dir / name).unlink()
    assert main(["--resume", str(run_dir), "--epochs", "2", "--no-progress"]) == 0
    assert_pngs(run_dir, IMAGE_PLOTS)


def test_lm_run_writes_its_curves_and_rewrites_them_on_resume(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "lm"
    assert main([*LM, "--data-dir", str(data_dir), "--max-steps", "2", "--out", str(run_dir)]) == 0
    assert_pngs(run_dir, LM_PLOTS)
    for name in LM_PLOTS:
        (run_dir / name).unlink()
    code = main(["--task", "lm", "--resume", str(run_dir), "--max-steps", "4", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert_pngs(run_dir, LM_PLOTS)


def test_a_failing_plot_is_one_line_and_the_run_succeeds(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts\nat all")
    monkeypatch.setattr(plots, "line_chart", broken)
    assert main([*IMAGE, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["no plots: drawing them failed (RuntimeError: no fonts at all); the run's "
                   "figures are in metrics.jsonl"]
    assert (tmp_path / "a" / "summary.json").is_file() and not list((tmp_path / "a").glob("*.png"))


def test_without_matplotlib_the_run_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main([*IMAGE, "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("no plots: matplotlib cannot be imported")
    assert (tmp_path / "a" / "summary.json").is_file()


SUMMARY = {"dataset": "digits", "device": "cpu (1 threads)", "inference": "stochastic",
           "memory_kind": "cpu_saved_for_backward", "seconds_per_epoch": 1.7}


def compare_runs(schedule: str, noprop_mib: float) -> tuple[dict, dict]:
    runs = {"noprop": {**SUMMARY, "block_schedule": schedule,
                       "peak_memory_bytes": int(noprop_mib * 2**20)},
            "backprop": {**SUMMARY, "block_schedule": None, "peak_memory_bytes": int(34.6 * 2**20)}}
    history = {m: [{"epoch": e, "train_loss": 3.0 / e, "test_accuracy": 0.9} for e in (1, 2)]
               for m in runs}
    return runs, history


def drawn_figures(monkeypatch) -> list:
    """Keep every figure the charts close, to measure their text after they are saved."""
    plt = plots.pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    return figures


def test_compare_charts_keep_every_label_inside_the_figure(tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    reports.write_plots(*compare_runs("all", 34.6), tmp_path)
    assert len(figures) == 4
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        texts = [t for ax in fig.axes for t in (ax.yaxis.label, ax.xaxis.label, ax.title)]
        for text in texts + list(fig.texts):
            if not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, \
                f"{text.get_text()!r} is cut off: {box} in {width}x{height}"


def test_memory_chart_of_all_blocks_per_step_names_the_sequential_schedule(tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    reports.write_plots(*compare_runs("all", 34.6), tmp_path)
    memory = figures[-1]
    notes = " ".join(t.get_text() for t in memory.texts).replace("\n", " ")
    assert "--block-schedule sequential" in notes
    captions = [t.get_text() for t in memory.axes[0].texts]
    assert captions == ["34.6 MiB\n1.00 x backprop", "34.6 MiB\n1.00 x backprop"]
    figures.clear()
    reports.write_plots(*compare_runs("sequential", 3.5), tmp_path)
    assert not figures[-1].texts  # the sequential schedule shows its saving: no note
    assert figures[-1].axes[0].texts[0].get_text() == "3.5 MiB\n0.10 x backprop"
