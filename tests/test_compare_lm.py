"""`python -m noprop_fast.compare --task lm`: report rows and the equal-tokens table, summary, plot,
refused run folders and options, and that `--task image` keeps its own fields.

One comparison on tiny byte shards (a 2-block, width-32 model, 4 steps, evaluated at steps 2 and 4
on the CPU), run once per module through the CLI's `main`, serves the report tests.
"""
import json
import re

import pytest

from noprop_fast.compare import main, parse_args
from helpers import text_shards, word_text

TINY = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "2",
        "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
        "--max-steps", "4", "--eval-every", "2", "--no-progress", "--device", "cpu"]
METHODS = ("noprop", "backprop")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return text_shards(tmp_path_factory.mktemp("shards"), word_text(2000))


@pytest.fixture(scope="module")
def cli_out(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-lm") / "cmp"
    assert main([*TINY, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return out


def table_rows(report: str, heading: str) -> list[list[str]]:
    """The cells of the data rows of the first table after `heading`."""
    lines = report.split(heading + "\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table[2:]  # without the header and the alignment row


def test_report_rows_match_the_runs(cli_out, data_dir):
    report = (cli_out / "report.md").read_text()
    runs = json.loads((cli_out / "summary.json").read_text())["runs"]
    assert report.startswith(f"# NoProp-LM vs a backprop GPT on {data_dir}\n")
    rows = {cells[0]: cells for cells in table_rows(report, "## Results")}
    assert set(rows) == set(METHODS)
    for method, cells in rows.items():
        _, loss, one_chain, ppl, entropy, tokens, seconds, tok_s, params = cells
        s = runs[method]
        assert loss == f"{s['val_loss']:.4f}" and ppl == f"{s['val_perplexity']:.2f}"
        assert entropy == f"{s['unigram_entropy']:.4f}"
        assert tokens == f"{4 * 4 * 16:,}" == f"{s['tokens_seen']:,}"
        assert params == f"{s['parameters']:,}" and float(seconds) >= 0
    assert rows["noprop"][2] == f"{runs['noprop']['val_loss_one_chain']:.4f}"
    assert rows["backprop"][2] == "-"
    # both runs were evaluated on the same val tokens, so the same unigram entropy
    assert runs["noprop"]["unigram_entropy"] == runs["backprop"]["unigram_entropy"]
    for text in ("- tokenizer: byte, vocabulary 257", "seq_len 16", "batch 4", "4 steps",
                 "2 chains, readout fitted, stochastic inference", "- torch: ", "nats per token"):
        assert text in report, text
    command = f"`python -m noprop_fast.compare {' '.join(TINY)} --data-dir {data_dir} --out {cli_out}`"
    assert command in report


def test_equal_tokens_table_has_every_evaluation(cli_out):
    report = (cli_out / "report.md").read_text()
    history = json.loads((cli_out / "summary.json").read_text())["history"]
    rows = table_rows(report, "## Validation loss at equal tokens seen")
    assert [(r[0], r[1]) for r in rows] == [("2", "128"), ("4", "256")]
    for i, row in enumerate(rows):
        noprop, gpt = history["noprop"][i], history["backprop"][i]
        assert row[2:] == [f"{noprop['val_loss']:.4f}", f"{noprop['val_loss_one_chain']:.4f}",
                           f"{gpt['val_loss']:.4f}"]


def test_summary_and_plot(cli_out):
    summary = json.loads((cli_out / "summary.json").read_text())
    assert set(summary) == {"config", "runs", "history"}
    assert summary["config"]["task"] == "lm" and summary["config"]["out"] == str(cli_out)
    for method in METHODS:
        assert summary["runs"][method]["method"] == method
        assert summary["runs"][method]["run_dir"] == str(cli_out / method)
        assert [r["step"] for r in summary["history"][method]] == [2, 4]
        assert (cli_out / method / "summary.json").is_file()
    png = (cli_out / "val_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_existing_run_folder_is_one_line_exit_2(cli_out, data_dir, capsys):
    capsys.readouterr()
    assert main([*TINY, "--data-dir", str(data_dir), "--methods", "backprop",
                 "--out", str(cli_out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err and str(cli_out / "backprop") in err


@pytest.mark.parametrize("args, message", [
    ([*TINY, "--method", "backprop"], "--methods"),
    ([*TINY, "--methods", "noprop,sgd"], "--methods"),
    ([*TINY, "--dataset", "digits"], "--dataset"),
    ([*TINY, "--embed-init", "mlm"], "embed_init"),
    ([*TINY, "--width", "30"], "width"),
    (["--task", "image", "--seq-len", "16"], "--seq-len"),
    (["--task", "text"], "--task"),
    ([*TINY, "--data-dir", "/nonexistent/shards"], "/nonexistent/shards"),
])
def test_bad_options_are_one_line_exit_2(data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    data = [] if "--data-dir" in args else ["--data-dir", str(data_dir)]
    assert main([*args, *data, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_task_image_keeps_its_fields():
    image = parse_args(["--epochs", "3", "--dataset", "digits"])  # values stay text until resolve
    assert image.task == "image" and image.epochs == "3" and not hasattr(image, "seq_len")
    assert parse_args(["--task", "image", "--epochs", "1"]).epochs == "1"
    lm = parse_args(["--task", "lm", "--seq-len", "16"])
    assert lm.seq_len == "16" and not hasattr(lm, "epochs")


def test_task_image_compare_runs(tmp_path, capsys):
    out = tmp_path / "img"
    assert main(["--task", "image", "--epochs", "1", "--num-blocks", "1", "--batch-size", "512",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# NoProp-DT vs backprop on digits")
    assert "- config: digits;" in report
    assert re.search(r"^\| noprop \(all\) \|", report, re.M)
    assert re.search(r"^\| backprop \|", report, re.M)
