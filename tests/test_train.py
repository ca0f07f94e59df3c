"""End to end on the bundled digits: runs, determinism, resume, NaN stop, label-free inference."""
import dataclasses
import json

import pytest
import torch

from noprop_fast import continuous, train
from noprop_fast.config import resolve
from noprop_fast.data import load_image_dataset
from noprop_fast.loop import Run
from noprop_fast.noprop import predict_classes
from noprop_fast.runs import load_checkpoint

TINY = ["--num-blocks", "2", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def run(tmp_path, name, *args):
    return train.run([*TINY, "--out", str(tmp_path / name), *args])


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(records):
    """The parts of an epoch record that must replay exactly (not the timings)."""
    return [{k: r.get(k) for k in ("epoch", "train_loss", "test_accuracy", "block_losses")} for r in records]


def test_run_writes_its_folder(tmp_path):
    summary = run(tmp_path, "a", "--epochs", "2")
    out = tmp_path / "a"
    for key in ("task", "method", "dataset", "epochs", "test_accuracy", "train_seconds",
                "peak_memory_bytes", "device"):
        assert key in summary
    assert summary["epochs"] == 2 and summary["task"] == "image" and summary["dataset"] == "digits"
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["peak_memory_bytes"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [r["epoch"] for r in history(out)] == [1, 2]
    assert (out / "checkpoint.pt").is_file() and (out / "config.yaml").is_file()
    assert not list(out.glob(".*.tmp"))  # the atomic write left no temporary file behind


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    run(tmp_path, "a", "--epochs", "1")
    run(tmp_path, "b", "--epochs", "1")
    run(tmp_path, "c", "--epochs", "1", "--seed", "1")
    a, b, c = (comparable(history(tmp_path / n)) for n in "abc")
    assert a == b
    assert a[0]["train_loss"] != c[0]["train_loss"]


@pytest.mark.parametrize("extra", [
    [], ["--block-schedule", "sequential"], ["--method", "backprop"],
    ["--method", "noprop-ct", "--embedding", "learned", "--inference-steps", "5"],
    ["--method", "noprop-fm", "--embedding", "learned", "--inference-steps", "5"]],
    ids=["dt", "dt-sequential", "backprop", "ct", "fm"])
def test_resumed_run_ends_like_the_uninterrupted_one(tmp_path, extra):
    run(tmp_path, "whole", "--epochs", "3", *extra)
    run(tmp_path, "split", "--epochs", "1", *extra)
    summary = train.run(["--resume", str(tmp_path / "split"), "--epochs", "3", "--no-progress"])
    assert summary["epochs"] == 3
    assert comparable(history(tmp_path / "split")) == comparable(history(tmp_path / "whole"))
    whole, split = (load_checkpoint(tmp_path / n)["model"] for n in ("whole", "split"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import noprop_fast.tasks.image as image_module
    real, calls = image_module.noprop_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 9 else loss), parts  # digits: 6 steps/epoch

    monkeypatch.setattr(image_module, "noprop_loss", poisoned)
    code = train.main([*TINY, "--epochs", "3", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "loss became nan at step 3 of epoch 2" in err[0] and "(epoch 1)" in err[0]
    assert load_checkpoint(tmp_path / "r")["progress"]["epoch"] == 1
    assert [r["epoch"] for r in history(tmp_path / "r")] == [1]


def trained_on_true_and_scrambled_labels(tmp_path, digits, cfg):
    """A run on digits and one on digits with every test label replaced at random, each fitted."""
    scrambled = dataclasses.replace(digits, test_y=torch.randint(0, 10, digits.test_y.shape,
                                                                 generator=torch.Generator().manual_seed(5)))
    for data, name in ((digits, "true"), (scrambled, "scrambled")):
        trainer = Run(cfg, data, tmp_path / name, show_progress=False)
        trainer.fit()
        yield trainer


def test_predictions_do_not_read_the_labels(tmp_path, digits):
    """Replace every test label: the predictions stay the same (docs/method.md section 8, mistake 1)."""
    cfg = resolve(None, {"num_blocks": "3", "epochs": "3", "batch_size": "64"})
    preds, accs = [], []
    for trainer in trained_on_true_and_scrambled_labels(tmp_path, digits, cfg):
        for stochastic in (True, False):
            preds.append(predict_classes(trainer.model, trainer.schedule, trainer.data.test_x,
                                         stochastic=stochastic, seed=3))
        accs.append(trainer.evaluate())
    assert torch.equal(preds[0], preds[2]) and torch.equal(preds[1], preds[3])
    # the labels are read only to score the predictions: against random labels the same model
    # scores chance (0.1 for 10 classes; one standard deviation over 360 images is 0.016)
    assert abs(accs[1] - 0.1) < 0.065 and accs[0] > 0.5, accs


@pytest.mark.parametrize("method, extra", [("noprop-ct", {"inference": "noise-free"}),
                                           ("noprop-fm", {"ode_solver": "heun"})])
def test_ct_and_fm_predictions_do_not_read_the_labels(tmp_path, digits, method, extra):
    """As above for the one-network variants: their chain and ODE see the images alone."""
    cfg = resolve(None, {"method": method, "epochs": "4", "batch_size": "64",
                         "inference_steps": "20", **extra})
    preds, accs = [], []
    for trainer in trained_on_true_and_scrambled_labels(tmp_path, digits, cfg):
        preds.append(continuous.predict_classes(trainer.model, trainer.data.test_x, 20, seed=3,
                                                solver=cfg.ode_solver))
        accs.append(trainer.evaluate())
    assert torch.equal(preds[0], preds[1])
    assert abs(accs[1] - 0.1) < 0.065 and accs[0] > 0.5, accs


def test_sequential_schedule_saves_a_fraction_of_the_activations(tmp_path):
    full = run(tmp_path, "all", "--epochs", "1", "--num-blocks", "4")
    seq = run(tmp_path, "seq", "--epochs", "1", "--num-blocks", "4", "--block-schedule", "sequential")
    bp = run(tmp_path, "bp", "--epochs", "1", "--num-blocks", "4", "--method", "backprop")
    assert seq["memory_kind"] == "cpu_saved_for_backward"
    # one block's activations instead of four: about a quarter (plus the shared classifier's)
    ratio_all = seq["peak_memory_bytes"] / full["peak_memory_bytes"]
    ratio_bp = seq["peak_memory_bytes"] / bp["peak_memory_bytes"]
    assert 0.2 < ratio_all < 0.3 and 0.2 < ratio_bp < 0.3, (ratio_all, ratio_bp)


def test_saved_tensor_bytes_counts_each_activation_storage_once_and_skips_parameters():
    from noprop_fast.memory import SavedTensorBytes
    weight = torch.nn.Parameter(torch.randn(8, 4))
    x = torch.randn(16, 8, requires_grad=True)
    with SavedTensorBytes(exclude=[weight]) as saved:
        h = x @ weight          # saves x (16 x 8) and weight (excluded)
        y = (h * h).sum()       # saves h twice: one storage (16 x 4)
        z = (h[:, :2] * weight[1, :2]).sum()  # a view of h (counted) and of the parameter (not)
    assert saved.bytes == (16 * 8 + 16 * 4) * 4
    (y + z).backward()


@pytest.mark.slow
def test_default_job_reaches_95_percent_on_digits(tmp_path):
    """The README's first command: the `digits` config, NoProp-DT, stochastic inference."""
    summary = train.run(["--no-progress", "--out", str(tmp_path / "default")])
    assert summary["method"] == "noprop" and summary["inference"] == "stochastic"
    assert summary["test_accuracy"] >= 0.95, summary


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "cifar100"])
def test_cli_trains_on_the_original_distribution_files(tmp_path, dataset):
    """`--dataset D --data-dir DIR` with the files as MNIST and CIFAR ship them (tiny, synthetic)."""
    from original_files import make_cifar, make_mnist
    if dataset == "mnist":
        make_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=40, n_test=10, gz=True)
    else:
        sub = "cifar-100-python" if dataset == "cifar100" else "cifar-10-batches-py"
        make_cifar(tmp_path / "data" / sub, cifar100=dataset == "cifar100", sizes=(8, 8, 8, 8, 8),
                   n_test=10)
    summary = train.run(["--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                         "--num-blocks", "2", "--batch-size", "16", "--no-progress",
                         "--out", str(tmp_path / "run")])
    assert summary["dataset"] == dataset and summary["epochs"] == 1
    assert str(tmp_path / "data") in summary["data_source"]


@pytest.mark.parametrize("schedule", ["all", "sequential"])
def test_optimizer_state_carries_on_across_epochs(tmp_path, digits, schedule):
    """AdamW's step counts and moments are the run's, not an epoch's (docs/method.md section 8,
    mistake 7): after 2 epochs every block has taken every step of both epochs."""
    cfg = resolve(None, {"num_blocks": "3", "epochs": "2", "batch_size": "256",
                         "block_schedule": schedule})
    trainer = Run(cfg, digits, tmp_path / schedule, show_progress=False)
    trainer.fit()
    batches = -(-digits.train_x.shape[0] // 256)  # the last partial batch trains too
    passes = 3 if schedule == "sequential" else 1  # one pass over the data per block slice
    counts = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            state = trainer.optimizer.state[p]
            if group["per_block"]:
                counts.setdefault("block", set()).update(state["step"].tolist())
            else:
                counts.setdefault("shared", set()).add(state["step"].item())
            assert state["exp_avg_sq"].abs().sum() > 0
    assert counts["block"] == {2.0 * batches}
    if "shared" in counts:  # the learned embedding and the classifier update on every step
        assert counts["shared"] == {2.0 * batches * passes}
