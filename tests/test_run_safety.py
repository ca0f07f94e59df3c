"""Runs that never lose work: a run folder that holds a run is refused (or replaced with
--overwrite), resume overrides are applied or refused, non-finite state stops a run before its
checkpoint, file-system faults and SIGTERM end in one line, and bad inputs are found before the
first training step. Every test drives the CLI (`train.main`) as a user would."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from noprop_fast import train
from noprop_fast.data.shards import write_shard
from noprop_fast.data.tokenizer import ByteTokenizer
from helpers import WORDS, text_shards, word_text

TINY = ["--num-blocks", "2", "--batch-size", "256", "--no-progress"]  # digits: 6 steps per epoch
LM = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "2",
      "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
      "--sample-tokens", "0", "--no-progress", "--device", "cpu"]


def main(args, capsys):
    code = train.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    text = word_text(1500, WORDS[:5])
    return text_shards(tmp_path_factory.mktemp("shards"), text, val_tokens=1000)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch digits run; tests copy it before changing anything."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert train.main([*TINY, "--epochs", "2", "--out", str(folder)]) == 0
    return folder


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- 1. a folder that holds a run --------------------------------------------------------------
def test_new_run_into_a_finished_run_is_refused_and_changes_nothing(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, out, err = main([*TINY, "--epochs", "1", "--seed", "1", "--out", run], capsys)
    line = one_line(err)
    assert code == 2 and "already holds a run" in line and f"--resume {run}" in line
    assert snapshot(run) == before  # every file byte-identical


def test_overwrite_replaces_the_run_and_starts_clean(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    code, out, err = main([*TINY, "--epochs", "1", "--seed", "1", "--overwrite", "--out", run], capsys)
    assert code == 0, err
    assert epochs(run) == [1]  # not 1, 2, 1: the old metrics are gone
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert "seed: 1" in (run / "config.yaml").read_text()
    size = (run / "checkpoint.pt").stat().st_size
    assert f"checkpoint {size / 1e6:.1f} MB" in out  # the closing line gives its size
    code, out, err = main(["--resume", run, "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "--overwrite" in one_line(err)


def test_lm_run_into_a_run_folder_is_refused(shards, tmp_path, capsys):
    args = [*LM, "--data-dir", shards, "--max-steps", "1", "--eval-every", "1", "--out", tmp_path / "r"]
    assert main(args, capsys)[0] == 0
    before = snapshot(tmp_path / "r")
    code, out, err = main([*args, "--seed", "3"], capsys)
    assert code == 2 and "already holds a run" in one_line(err)
    assert snapshot(tmp_path / "r") == before
    code, out, err = main([*args, "--seed", "3", "--overwrite"], capsys)
    assert code == 0, err
    assert "seed: 3" in (tmp_path / "r" / "config.yaml").read_text()
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1


def test_compare_overwrite_replaces_its_runs(tmp_path, capsys):
    from noprop_fast import compare
    args = ["--num-blocks", "2", "--batch-size", "256", "--epochs", "1", "--methods", "noprop",
            "--no-progress", "--out", str(tmp_path / "c")]
    assert compare.main(args) == 0
    assert compare.main(args) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert compare.main([*args, "--overwrite"]) == 0
    assert epochs(tmp_path / "c" / "noprop") == [1]


# -- 2. resume overrides ------------------------------------------------------------------------
def test_resume_applies_a_new_lr_and_weight_decay_and_records_them(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    code, out, err = main(["--resume", run, "--epochs", "3", "--lr", "0.0005",
                           "--weight-decay", "0.01", "--no-progress"], capsys)
    assert code == 0, err
    groups = torch.load(run / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert all(g["lr"] == 0.0005 and g["weight_decay"] == 0.01 for g in groups)  # what it trained with
    config = (run / "config.yaml").read_text()
    assert "lr: 0.0005" in config and "weight_decay: 0.01" in config and "epochs: 3" in config


def test_lm_resume_applies_a_new_lr(shards, tmp_path, capsys):
    args = [*LM, "--data-dir", shards, "--max-steps", "1", "--eval-every", "1", "--out", tmp_path / "r"]
    assert main(args, capsys)[0] == 0
    code, out, err = main(["--resume", tmp_path / "r", "--max-steps", "2", "--lr", "0.002",
                           "--no-progress"], capsys)
    assert code == 0, err
    groups = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    assert all(g["lr"] == 0.002 for g in groups)
    assert "lr: 0.002" in (tmp_path / "r" / "config.yaml").read_text()


@pytest.mark.parametrize("override", [["--eta", "inf"], ["--eta", "0.2"], ["--seed", "5"],
                                      ["--batch-size", "64"], ["--epochs", "1"]])
def test_refused_resume_overrides_leave_the_folder_as_it_was(finished, tmp_path, capsys, override):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, out, err = main(["--resume", run, *override, "--no-progress"], capsys)
    assert code == 2 and override[0] in one_line(err)
    assert snapshot(run) == before


def test_a_resume_that_fails_in_training_leaves_config_yaml_as_it_was(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, out, err = main(["--resume", run, "--epochs", "4", "--lr", "1e30", "--no-progress"], capsys)
    line = one_line(err)
    assert code == 2 and ("loss became" in line or "non-finite" in line)
    assert snapshot(run) == before  # config, checkpoint, metrics: the last good epoch's
    code, out, err = main(["--resume", run, "--epochs", "3", "--no-progress"], capsys)
    assert code == 0, err  # a plain resume still works


# -- 3. non-finite state ------------------------------------------------------------------------
def test_inf_batchnorm_statistics_stop_the_run_before_its_checkpoint(tmp_path, monkeypatch, capsys):
    from noprop_fast.loop import Run
    real, calls = Run.train_on, {"n": 0}

    def overflowing(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 8:  # in epoch 2: the running variances overflow, the loss stays finite
            self.model.blocks.latent_bn1.running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(Run, "train_on", overflowing)
    code, out, err = main([*TINY, "--epochs", "3", "--out", tmp_path / "r"], capsys)
    line = one_line(err)
    assert code == 2 and "running_var" in line and "after epoch 2" in line and "(epoch 1)" in line
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["progress"]["epoch"] == 1 and all_finite(state["model"]) and all_finite(state["optimizer"])
    assert epochs(tmp_path / "r") == [1]


def test_lm_non_finite_optimiser_state_stops_the_run(shards, tmp_path, monkeypatch, capsys):
    from noprop_fast.loop import Run
    real, calls = Run.train_on, {"n": 0}

    def overflowing(self, *args):
        loss = real(self, *args)
        calls["n"] += 1
        if calls["n"] == 3:  # exp_avg_sq = inf: the update is 0, weights and loss stay finite
            next(iter(self.optimizer.state.values()))["exp_avg_sq"].fill_(float("inf"))
        return loss

    monkeypatch.setattr(Run, "train_on", overflowing)
    code, out, err = main([*LM, "--data-dir", shards, "--max-steps", "6", "--eval-every", "2",
                           "--out", tmp_path / "r"], capsys)
    line = one_line(err)
    assert code == 2 and "exp_avg_sq" in line and "at step 4" in line and "(step 2)" in line
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["progress"]["step"] == 2 and all_finite(state["model"]) and all_finite(state["optimizer"])


def test_a_non_finite_checkpoint_is_not_resumed(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    state["model"]["blocks.fuse_bn1.running_var"].fill_(float("nan"))
    torch.save(state, run / "checkpoint.pt")
    code, out, err = main(["--resume", run, "--epochs", "3", "--no-progress"], capsys)
    line = one_line(err)
    assert code == 2 and "fuse_bn1.running_var" in line and "cannot be resumed" in line


# -- 4. file-system faults ----------------------------------------------------------------------
def test_out_under_a_file_is_one_line_before_the_data_loads(tmp_path, monkeypatch, capsys):
    import noprop_fast.data as data_module
    monkeypatch.setattr(data_module, "load_image_dataset", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "file").write_text("x")
    code, out, err = main([*TINY, "--out", tmp_path / "file" / "run"], capsys)
    assert code == 2 and str(tmp_path / "file" / "run") in one_line(err)


@contextmanager
def read_only_folder(path: Path):
    """`path` made read-only: by its mode for a user, by a read-only bind mount for root (whom a
    mode does not stop); skipped where neither is possible."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield
        path.chmod(0o755)
        return
    mount = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"root, and no read-only bind mount here: {mount.stderr.decode().strip()}")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)]).returncode != 0:
            pytest.skip("root, and the bind mount cannot be made read-only here")
        yield
    finally:
        subprocess.run(["umount", str(path)])


def test_read_only_out_is_one_line_before_the_data_loads(tmp_path, monkeypatch, capsys):
    import noprop_fast.data as data_module
    monkeypatch.setattr(data_module, "load_image_dataset", lambda *a, **k: pytest.fail("loaded"))
    with read_only_folder(tmp_path / "ro"):
        code, out, err = main([*TINY, "--out", tmp_path / "ro" / "run"], capsys)
    line = one_line(err)
    assert code == 2 and str(tmp_path / "ro") in line, line
    assert "Permission denied" in line or "Read-only file system" in line, line
    assert not list((tmp_path / "ro").iterdir())


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_keeps_the_last_checkpoint_and_leaves_no_tmp(finished, tmp_path, capsys):
    """The checkpoint's temporary file is a link to /dev/full: every write to it fails with
    ENOSPC, through the real write path."""
    run = copy_run(finished, tmp_path / "run")
    good = (run / "checkpoint.pt").read_bytes()
    (run / ".checkpoint.pt.tmp").symlink_to("/dev/full")
    code, out, err = main(["--resume", run, "--epochs", "3", "--no-progress"], capsys)
    line = one_line(err)
    assert code == 2 and str(run / "checkpoint.pt") in line and "No space left on device" in line
    assert not list(run.glob(".*.tmp")) and (run / "checkpoint.pt").read_bytes() == good


def test_sigterm_ends_like_ctrl_c_keeping_the_last_checkpoint(tmp_path):
    run = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "noprop_fast.train", *TINY, "--epochs", "1000",
                             "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (run / "checkpoint.pt").exists(), proc.stderr.read() if proc.poll() is not None else ""
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "SIGTERM" in one_line(err) and "checkpoint is kept" in err
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["progress"]["epoch"] >= 1 and not list(run.glob(".*.tmp"))


# -- 5. checks before the first training step ---------------------------------------------------
@pytest.fixture
def no_image_step(monkeypatch):
    from noprop_fast.loop import Run
    monkeypatch.setattr(Run, "train_on", lambda *a, **k: pytest.fail("trained"))


@pytest.fixture
def no_lm_step(monkeypatch):
    from noprop_fast.loop import Run
    monkeypatch.setattr(Run, "train_on", lambda *a, **k: pytest.fail("trained"))


def test_empty_mnist_test_split_is_found_before_training(tmp_path, capsys, no_image_step):
    from original_files import make_mnist
    make_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=40, n_test=0)
    code, out, err = main(["--dataset", "mnist", "--data-dir", tmp_path / "data", "--epochs", "1",
                           "--num-blocks", "2", "--batch-size", "16", "--no-progress",
                           "--out", tmp_path / "r"], capsys)
    assert code == 2 and "test split is empty" in one_line(err)


def test_short_validation_shard_is_found_before_training(shards, tmp_path, capsys, no_lm_step):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "demo_train_000001.bin").write_bytes((shards / "demo_train_000001.bin").read_bytes())
    write_shard(folder / "demo_val_000000.bin", [256, 65, 66, 67, 68], tokenizer="byte")
    code, out, err = main([*LM, "--data-dir", folder, "--max-steps", "2", "--out", tmp_path / "r"], capsys)
    line = one_line(err)
    assert code == 2 and "val split" in line and "5 tokens" in line


def test_shard_vocabulary_that_is_not_the_tokenizers_is_found_before_training(tmp_path, capsys,
                                                                              no_lm_step):
    ids = ByteTokenizer().encode("alpha beta gamma delta " * 40)
    write_shard(tmp_path / "d" / "x_val_000000.bin", ids[:200], tokenizer="byte", vocab_size=300)
    write_shard(tmp_path / "d" / "x_train_000001.bin", ids[200:], tokenizer="byte", vocab_size=300)
    code, out, err = main([*LM, "--data-dir", tmp_path / "d", "--max-steps", "2",
                           "--out", tmp_path / "r"], capsys)
    line = one_line(err)
    assert code == 2 and "300" in line and "257" in line


def test_gpt2_samples_without_tiktoken_are_found_before_training(tmp_path, capsys, monkeypatch,
                                                                 no_lm_step):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken: ImportError
    rng = np.random.default_rng(1)
    write_shard(tmp_path / "d" / "x_val_000000.bin", rng.integers(0, 500, 300), tokenizer="gpt2")
    write_shard(tmp_path / "d" / "x_train_000001.bin", rng.integers(0, 500, 900), tokenizer="gpt2")
    args = [a for a in LM if a not in ("--sample-tokens", "0")]
    code, out, err = main([*args, "--data-dir", tmp_path / "d", "--sample-tokens", "5",
                           "--max-steps", "2", "--out", tmp_path / "r"], capsys)
    line = one_line(err)
    assert code == 2 and "tiktoken" in line and "--sample-tokens 0" in line
    assert "--tokenizer" not in line  # an option of the prepare command, not of this one


# -- the checkpoint's size ----------------------------------------------------------------------
def test_checkpoint_holds_weights_and_two_moments_once_and_reports_its_size(finished):
    summary = json.loads((finished / "summary.json").read_text())
    size = (finished / "checkpoint.pt").stat().st_size
    assert summary["checkpoint_bytes"] == size
    state = torch.load(finished / "checkpoint.pt", weights_only=False)
    params = sum(v.numel() * v.element_size() for v in state["model"].values())
    storages = [t.untyped_storage().data_ptr() for t in
                [*state["model"].values(), *(v for s in state["optimizer"]["state"].values()
                                             for v in s.values())]]
    assert len(storages) == len(set(storages))  # nothing stored twice
    assert 3 * params * 0.95 < size < 3 * params + 2**20  # weights, AdamW's m and v, small extras


def test_overwrite_clears_the_old_runs_plots_too(tmp_path):
    """An --overwrite run that stops before its end must not leave the old run's curves beside
    its own files."""
    from noprop_fast import runs
    for name in (*runs.RUN_FILES, *runs.RUN_PLOTS):
        (tmp_path / name).write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    runs.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
