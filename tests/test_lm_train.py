"""`python -m noprop_fast.train --task lm` end to end, on small shards written here: the summary,
samples, exact resume, the GPT baseline, masked-LM embeddings, the fused path, one-line errors,
and that NoProp-LM learns (its validation loss falls well below the unigram entropy)."""
import json

import numpy as np
import pytest
import torch

from noprop_fast.train import main

TINY = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "2",
        "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
        "--sample-tokens", "5", "--num-samples", "1", "--no-progress", "--device", "cpu"]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_lm_run_writes_summary_and_samples(word_shards, tmp_path, capsys):
    code, out, err = run(TINY + ["--data-dir", str(word_shards), "--max-steps", "4",
                                 "--eval-every", "2",
                                 "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    for key in ("val_loss", "val_loss_one_chain", "tokens_seen", "tokens_per_second", "tokenizer",
                "unigram_entropy", "val_perplexity"):
        assert summary[key] is not None, key
    assert summary["tokenizer"] == "byte" and summary["tokens_seen"] == 4 * 4 * 16
    assert np.isfinite(summary["val_loss"]) and summary["val_tokens"] == 64
    assert "unigram entropy" in out and "--- sample 1" in out
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def _state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize("extra", [[], ["--method", "backprop"], ["--fused"],
                                   ["--block-ce", "1", "--readout", "blocks",
                                    "--calibrate-tokens", "200", "--fit-temperature"]],
                         ids=["noprop", "backprop", "noprop-fused", "noprop-block-ce-calibrated"])
def test_lm_resume_replays_the_uninterrupted_run(word_shards, tmp_path, capsys, extra):
    base = TINY + extra + ["--data-dir", str(word_shards), "--eval-every", "2",
                          "--sample-tokens", "0"]
    assert run(base + ["--max-steps", "4", "--out", str(tmp_path / "whole")], capsys)[0] == 0
    assert run(base + ["--max-steps", "2", "--out", str(tmp_path / "part")], capsys)[0] == 0
    code, out, err = run(["--task", "lm", "--resume", str(tmp_path / "part"), "--max-steps", "4",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming" in out
    whole, part = _state(tmp_path / "whole"), _state(tmp_path / "part")
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert whole["progress"]["history"][-1]["val_loss"] == part["progress"]["history"][-1]["val_loss"]


def test_sample_from_a_finished_run(word_shards, tmp_path, capsys):
    args = TINY + ["--data-dir", str(word_shards), "--max-steps", "2", "--eval-every", "2",
                   "--sample-tokens", "0", "--out", str(tmp_path / "r")]
    assert run(args, capsys)[0] == 0
    code, out, err = run(["--task", "lm", "--resume", str(tmp_path / "r"), "--sample", "beta ",
                          "--sample-tokens", "8", "--no-progress"], capsys)
    assert code == 0, err
    assert "--- sample 1" in out and "\nbeta " in out


def test_mlm_embeddings_are_pretrained_and_frozen(word_shards, tmp_path, capsys):
    args = TINY + ["--data-dir", str(word_shards), "--embed-init", "mlm", "--mlm-steps", "3",
                   "--eval-every", "1", "--sample-tokens", "0"]
    assert run(args + ["--max-steps", "1", "--out", str(tmp_path / "a")], capsys)[0] == 0
    code, out, err = run(["--task", "lm", "--resume", str(tmp_path / "a"), "--max-steps", "3",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "masked-LM" not in out  # a resumed run keeps its embeddings, it does not pre-train again
    first = _state(tmp_path / "a")["model"]["embedding.weight"]
    norms = first.norm(dim=1)
    assert norms.mean().item() == pytest.approx(1.0, rel=1e-5)
    state = _state(tmp_path / "a")
    assert state["progress"]["step"] == 3
    # frozen: the resumed steps left W_embed as the pre-training made it
    fresh = tmp_path / "b"
    assert run(args + ["--max-steps", "1", "--out", str(fresh)], capsys)[0] == 0
    assert torch.equal(_state(fresh)["model"]["embedding.weight"], state["model"]["embedding.weight"])


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent/shards"], "/nonexistent/shards"),
    (["--width", "30", "--heads", "4"], "width"),
    (["--method", "backprop", "--embed-init", "mlm"], "embed_init"),
    (["--dataset", "mnist"], "--dataset"),
    (["--readout", "blocks", "--parallel", "blocks"], "readout"),
    (["--readout", "fitted", "--calibrate-tokens", "0"], "readout"),
])
def test_lm_errors_are_one_line(word_shards, tmp_path, capsys, args, message):
    base = TINY + (["--data-dir", str(word_shards)] if "--data-dir" not in args else [])
    code, out, err = run(base + args + ["--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_noprop_lm_learns_below_the_unigram_entropy(word_shards, tmp_path, capsys):
    """Words drawn at random from a few: within a word the next byte is nearly certain, so a model
    that learned anything beats the byte unigram entropy by far; NoProp-LM must too."""
    args = ["--task", "lm", "--data-dir", str(word_shards), "--width", "64", "--heads", "4",
            "--embed-dim", "32", "--num-blocks", "4", "--seq-len", "32", "--batch-size", "16",
            "--max-steps", "150", "--eval-every", "150", "--eval-tokens", "1024", "--lr", "0.003",
            "--sample-tokens", "0", "--no-progress", "--out", str(tmp_path / "r")]
    code, out, err = run(args, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["val_loss"] < 0.6 * summary["unigram_entropy"], summary


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--precision", "fp16"],
                                   ["--precision", "bf16", "--method", "backprop"],
                                   ["--precision", "bf16", "--fused"]],
                         ids=["bf16", "fp16", "backprop-bf16", "fused-bf16"])
def test_lm_trains_in_every_precision(word_shards, tmp_path, capsys, extra):
    args = TINY + extra + ["--data-dir", str(word_shards), "--max-steps", "3", "--eval-every", "3",
                           "--sample-tokens", "0", "--out", str(tmp_path / "r")]
    code, out, err = run(args, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["precision"] == extra[1] and np.isfinite(summary["val_loss"])


def test_the_task_follows_the_config_or_the_resumed_run(word_shards, tmp_path, capsys):
    from noprop_fast.train import parse_args
    assert parse_args(["--config", "stdlib"]).task == "lm"
    assert parse_args(["--config", "digits"]).task == "image"
    assert parse_args([]).task == "image"
    args = TINY[2:] + ["--data-dir", str(word_shards), "--max-steps", "1", "--eval-every", "1",
                       "--sample-tokens", "0", "--out", str(tmp_path / "r")]
    assert run(["--config", "stdlib"] + args, capsys)[0] == 0  # no --task: the config's
    code, out, err = run(["--resume", str(tmp_path / "r"), "--max-steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert parse_args(["--resume", str(tmp_path / "r")]).task == "lm"
