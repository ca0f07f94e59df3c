"""The fused path on CPU (the C++ ops) against the reference path, and `--fused` / `--precision`
from the command line: same losses step by step, the same run resumed, a clear line and the
reference ops where the C++ ops cannot be built."""
import json
import os
import subprocess
import sys

import pytest
import torch

from noprop_fast import train
from noprop_fast.ops import cpp as cpu_ops
from noprop_fast.ops import REFERENCE, resolve_ops
from noprop_fast.runs import load_checkpoint
from step_equivalence import assert_same_losses, losses_side_by_side

TINY = ["--num-blocks", "2", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def cpp():
    ok, reason = cpu_ops.available()
    assert ok, f"the C++ ops must build on this machine: {reason}"


@pytest.mark.parametrize("config", [
    {"embedding": "onehot"},
    {"embedding": "learned", "block_schedule": "sequential"},
    {"embedding": "prototype"},
    {"embedding": "onehot", "method": "backprop"},
    {"embedding": "onehot", "method": "noprop-ct"},
    {"embedding": "learned", "method": "noprop-ct"},
    {"embedding": "prototype", "method": "noprop-fm"},
    {"embedding": "learned", "method": "noprop-fm"},
], ids=["onehot", "learned-sequential", "prototype", "backprop", "ct-onehot", "ct-learned",
        "fm-prototype", "fm-learned"])
def test_cpp_path_matches_reference_step_by_step(cpp, config):
    assert_same_losses(losses_side_by_side("cpp", steps=4, **config))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpp_path_matches_reference_in_low_precision(cpp, precision):
    assert_same_losses(losses_side_by_side("cpp", steps=3, precision=precision), precision)


@pytest.mark.parametrize("extra", [[], ["--method", "noprop-ct", "--inference-steps", "5"],
                                   ["--method", "noprop-fm", "--inference-steps", "5"]],
                         ids=["dt", "ct", "fm"])
def test_fused_run_resumes_exactly(cpp, tmp_path, extra):
    whole = train.run([*TINY, *extra, "--fused", "--epochs", "2", "--out", str(tmp_path / "whole")])
    train.run([*TINY, *extra, "--fused", "--epochs", "1", "--out", str(tmp_path / "split")])
    split = train.run(["--resume", str(tmp_path / "split"), "--epochs", "2", "--no-progress"])
    assert whole["ops"] == split["ops"] == "cpp"
    a, b = (load_checkpoint(tmp_path / n)["model"] for n in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    histories = [[json.loads(line)["train_loss"] for line in (tmp_path / n / "metrics.jsonl")
                  .read_text().splitlines()] for n in ("whole", "split")]
    assert histories[0] == histories[1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_run_tracks_fp32(tmp_path, precision):
    """A first epoch in bf16 (fp16: with loss scaling) ends near the fp32 run's loss."""
    fp32 = train.run([*TINY, "--epochs", "1", "--out", str(tmp_path / "fp32")])
    low = train.run([*TINY, "--precision", precision, "--epochs", "1", "--out", str(tmp_path / precision)])
    assert low["precision"] == precision and fp32["precision"] == "fp32"
    losses = [json.loads((tmp_path / n / "metrics.jsonl").read_text())["train_loss"]
              for n in ("fp32", precision)]
    assert abs(losses[1] - losses[0]) < 1e-2 * losses[0], losses


def test_unavailable_fused_ops_fall_back_with_one_line(monkeypatch):
    def no_compiler():
        raise cpu_ops.FusedOpsUnavailable("the C++ fused ops could not be built: no C++ compiler")
    monkeypatch.setattr(cpu_ops, "load", no_compiler)
    said = []
    assert resolve_ops(True, torch.device("cpu"), warn=said.append).name == "reference"
    assert len(said) == 1 and "\n" not in said[0]
    assert "no C++ compiler" in said[0] and "using the reference ops" in said[0]
    assert resolve_ops(False, torch.device("cpu"), warn=said.append) is REFERENCE and len(said) == 1


def test_cli_without_a_compiler_says_so_and_trains(tmp_path):
    """A new user's machine without g++: `--fused` prints one line and the run completes."""
    env = {**os.environ, "CXX": "/nonexistent/g++", "CC": "/nonexistent/gcc",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    result = subprocess.run(
        [sys.executable, "-m", "noprop_fast.train", *TINY, "--fused", "--epochs", "1",
         "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if line.startswith("--fused:")]
    assert len(notices) == 1 and "using the reference ops" in notices[0], result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ops"] == "reference"


@pytest.mark.slow
def test_fused_default_job_reaches_95_percent_on_digits(cpp, tmp_path):
    """The README's first command with --fused: the same accuracy bar as the reference path."""
    summary = train.run(["--fused", "--no-progress", "--out", str(tmp_path / "fused")])
    assert summary["ops"] == "cpp"
    assert summary["test_accuracy"] >= 0.95, summary


def test_check_labels_turns_the_noise_flag_into_a_data_error():
    """The Triton noise injection flags a label outside [0, m) on the device; the trainers call
    ops.check_labels() when a loss is not finite, which raises it as one line (a DataError) and
    resets the flag. The flag is set here as the kernel would (position 3 of y, W with 4 rows)."""
    pytest.importorskip("triton")
    from noprop_fast.errors import DataError
    from noprop_fast.ops import check_labels
    from noprop_fast.kernels import noise

    check_labels()  # nothing flagged: no error
    flag = torch.tensor([3])
    noise._bad_labels[torch.device("cpu")] = (flag, 4)
    try:
        with pytest.raises(DataError, match=r"noise_injection: label at position 3 is outside \[0, 4\)"):
            check_labels()
        assert int(flag) == noise._NO_BAD_LABEL
        check_labels()
    finally:
        noise._bad_labels.pop(torch.device("cpu"))
