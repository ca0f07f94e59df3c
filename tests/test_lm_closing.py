"""The closing lines of a language-model run explain its numbers: lower is better, the unigram
entropy of the same tokens, where a GPT of the same size stands (this run, a matching comparison,
or the command that measures it), what `train loss` is, and that small models' samples are
gibberish."""
import json
import shlex
from pathlib import Path

import pytest

from noprop_fast import compare
from noprop_fast.reports import closing_lines
from noprop_fast.train import main

TINY = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "2",
        "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
        "--max-steps", "2", "--eval-every", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from helpers import text_shards
    return text_shards(tmp_path_factory.mktemp("shards"), "lower is better, said the loss. " * 80)


def train(args, capsys) -> tuple[str, dict]:
    out_dir = args[args.index("--out") + 1]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return capsys.readouterr().out, summary


def test_noprop_run_says_what_its_numbers_mean(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no reports/ here: no comparison to quote
    out, summary = train([*TINY, "--data-dir", str(data_dir), "--sample-tokens", "4",
                          "--num-samples", "1", "--out", "run"], capsys)
    text = " ".join(out.split())
    gap = summary["unigram_entropy"] - summary["val_loss"]
    assert "lower is better" in text
    assert f"unigram entropy of these val tokens, {summary['unigram_entropy']:.4f} nats/token" in text
    assert (f"is {gap:.4f} below it" if gap > 0 else f"is {-gap:.4f} above it") in text
    assert "`python -m noprop_fast.compare --task lm --config run/config.yaml` trains both" in text
    assert "train loss (in the lines above) is the NoProp objective" in text
    assert "not comparable with the val loss" in text
    assert "small byte-level model" in text and "gibberish" in text
    # the explanation comes before the samples it warns about
    assert out.index("gibberish") < out.index("--- sample 1")


def test_gpt_run_is_its_own_reference_and_its_train_loss_a_cross_entropy(data_dir, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, _ = train([*TINY, "--data-dir", str(data_dir), "--method", "backprop",
                    "--sample-tokens", "0", "--out", "gpt"], capsys)
    text = " ".join(out.split())
    assert "lower is better" in text and "This run is the GPT baseline" in text
    assert "the GPT's cross-entropy on its training batches" in text
    assert "NoProp objective" not in text and "gibberish" not in text  # no samples printed


def test_the_printed_comparison_is_quoted_by_the_next_run_of_that_shape(data_dir, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = [*TINY, "--data-dir", str(data_dir), "--sample-tokens", "0"]
    out, _ = train([*base, "--out", "first"], capsys)
    command = next(line.split("`")[1] for line in out.splitlines() if "noprop_fast.compare" in line)
    argv = shlex.split(command)[3:]  # after python -m noprop_fast.compare
    assert compare.main([*argv, "--no-progress", "--out", "reports/compare-lm-test"]) == 0
    gpt = json.loads((tmp_path / "reports/compare-lm-test/summary.json").read_text())["runs"]["backprop"]
    capsys.readouterr()
    out, _ = train([*base, "--out", "second"], capsys)
    assert (f"A GPT of the same width and depth reached {gpt['val_loss']:.4f} on the same val tokens "
            f"after {gpt['tokens_seen']:,} tokens (reports/compare-lm-test/summary.json)") in out
    out, _ = train([*base, "--width", "64", "--out", "wider"], capsys)  # another shape
    assert "A GPT of the same width and depth on the same tokens: `python -m" in out


def test_a_model_past_the_small_sizes_gets_no_gibberish_warning():
    from noprop_fast.config import LMConfig
    cfg = LMConfig(out="r")
    summary = {"val_loss": 3.1, "unigram_entropy": 7.0, "tokens_seen": 10**9, "tokenizer": "gpt2",
               "parameters": 124_000_000, "val_tokens": 10**7}
    lines = closing_lines(cfg, summary, samples_follow=True, reports=cfg.out)
    assert not any("gibberish" in line for line in lines)
    summary["tokenizer"] = "byte"
    assert any("gibberish" in line for line in closing_lines(cfg, summary, True, reports=cfg.out))
