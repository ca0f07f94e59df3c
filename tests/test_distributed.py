"""Multi-process training (distributed.py) on the CPU with gloo: 2 processes launched by torchrun's
own module (`python -m torch.distributed.run --standalone`), compared with one process from the same
seed, and the failures that must end every rank with a message instead of a hang.

Tolerances. `--parallel blocks` gives every block the numbers of one process; only the sums of the
shared gradients over the ranks add in another order, so parameters after several steps agree to
ATOL = 1e-5 (measured: 0 for the image task, about 1e-7 for the language model). `--parallel data`
splits every batch's sums into one per rank: the language model (LayerNorm only) agrees to ATOL
after several steps (measured about 2e-7). The image model's BatchNorm and AdamW make it chaotic at rounding
level: several of its gradients are exactly zero in exact arithmetic (a bias before a BatchNorm),
so their float values are rounding noise that AdamW turns into steps of up to lr, and a 1e-6
relative change of the gradients in a single process moves the gradients by ~2% two steps later.
For the image task's data mode the test therefore compares one step: the loss, the gradient (read
from AdamW's first moment, m = (1 - beta1) g) to GRAD_RTOL of its norm, and the BatchNorm running
statistics (the synchronised batch statistics) to ATOL.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from noprop_fast import train
from noprop_fast.distributed import plan_layout, split_blocks
from noprop_fast.errors import ConfigError

ATOL = 1e-5        # parameters after a few steps (lr 1e-3: 1% of one step's largest move)
GRAD_RTOL = 1e-5   # ||g_parallel - g_single|| / ||g_single|| over all parameters
LAUNCH_TIMEOUT = 180
IMAGE = ["--num-blocks", "4", "--batch-size", "256", "--dropout", "0", "--no-progress",
         "--dist-timeout", "60"]
LM = ["--task", "lm", "--width", "32", "--heads", "2", "--embed-dim", "8", "--num-blocks", "3",
      "--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--eval-chains", "2",
      "--sample-tokens", "0", "--no-progress", "--device", "cpu", "--eval-every", "2",
      "--dist-timeout", "60", "--readout", "classifier",  # split blocks: z_T's readout alone
      "--calibrate-tokens", "0"]


def torchrun(args: list[str], nproc: int = 2, module: str = "noprop_fast.train",
             timeout: float = LAUNCH_TIMEOUT):
    """Launch `nproc` processes with torchrun's module; returns (returncode, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = ["-m", module] if module else []
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(nproc), *target, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def single(args: list[str]) -> None:
    """One process, in this one, on one thread as each torchrun process is (OMP_NUM_THREADS=1):
    another thread count picks other conv algorithms, whose rounding AdamW amplifies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def assert_same_parameters(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, atol=atol, rtol=0, msg=name)
    for i, entry in a["optimizer"]["state"].items():  # AdamW's moments and per-block steps too
        for key, value in entry.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][key], value, atol=atol, rtol=0)


# -- the layout ----------------------------------------------------------------------------------
def test_blocks_split_into_contiguous_slices():
    assert split_blocks(10, 2) == [(0, 5), (5, 10)]
    assert split_blocks(7, 3) == [(0, 3), (3, 5), (5, 7)]   # uneven: the first ones take one more
    assert split_blocks(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ConfigError, match="cannot split"):
        split_blocks(2, 3)


def test_world_factors_into_block_ranks_times_data_ranks():
    lay = plan_layout("blocks+data", 2, world_size=6, rank=5, num_blocks=10)
    assert (lay.block_ranks, lay.data_ranks) == (2, 3)
    assert (lay.block_index, lay.data_index, lay.span) == (1, 2, (5, 10))
    assert lay.rank_of(lay.block_index, lay.data_index) == 5 and lay.holds_last_block
    assert plan_layout("blocks", 0, 4, 1, 10).span == (3, 6)
    assert plan_layout("data", 0, 4, 3, 10).spans == ((0, 10),)
    for parallel, k, world, message in [("blocks+data", 4, 6, "not a multiple"),
                                        ("blocks+data", 0, 4, "needs --block-ranks"),
                                        ("blocks", 3, 4, "does not match"),
                                        ("data", 2, 4, "asks to split"),
                                        ("blocks", 0, 11, "cannot split")]:
        with pytest.raises(ConfigError, match=message):
            plan_layout(parallel, k, world, 0, 10)
    with pytest.raises(ConfigError, match="backprop"):
        plan_layout("blocks", 0, 2, 0, 10, method="backprop")
    with pytest.raises(ConfigError, match="sequential"):
        plan_layout("blocks", 0, 2, 0, 10, block_schedule="sequential")


# -- equality with one process, and checkpoints both ways ---------------------------------------
def test_image_blocks_match_one_process_and_resume_in_one(tmp_path):
    code, out, err = torchrun([*IMAGE, "--epochs", "1", "--parallel", "blocks",
                               "--out", str(tmp_path / "two")])
    assert code == 0, err
    # the shared gradients are the classifier's 10 x 10 + 10 floats, with the loss figures
    # 1 + T: (110 + 5) x 4 bytes
    assert "blocks [(0, 2), (2, 4)]" in out and "shared grads + loss 460 B" in out
    assert "epoch 1/1" in out and out.count("epoch 1/1") == 1  # rank 0 alone prints
    single([*IMAGE, "--epochs", "1", "--out", str(tmp_path / "one")])
    two, one = state(tmp_path / "two"), state(tmp_path / "one")
    assert_same_parameters(one, two)
    assert two["progress"]["history"][0]["test_accuracy"] == \
        one["progress"]["history"][0]["test_accuracy"]  # the Eq. 3 chain across the ranks
    # the 2-process checkpoint goes on in one process exactly as one process would have
    single(["--resume", str(tmp_path / "two"), "--epochs", "2", "--parallel", "none",
            "--no-progress"])
    single([*IMAGE, "--epochs", "2", "--out", str(tmp_path / "one2")])
    assert_same_parameters(state(tmp_path / "one2"), state(tmp_path / "two"))


def test_image_data_step_matches_one_process(tmp_path):
    # one step per epoch: the whole training split (1437 images) in one batch
    args = [*IMAGE, "--epochs", "1", "--batch-size", "1437"]
    code, out, err = torchrun([*args, "--parallel", "data", "--out", str(tmp_path / "two")])
    assert code == 0, err
    assert "1 block ranks x 2 data ranks" in out and "BatchNorm statistics" in out
    single([*args, "--out", str(tmp_path / "one")])
    two, one = state(tmp_path / "two"), state(tmp_path / "one")
    loss = [s["progress"]["history"][0]["train_loss"] for s in (one, two)]
    assert loss[1] == pytest.approx(loss[0], rel=1e-6)
    ids = sorted(one["optimizer"]["state"])  # every trained parameter: blocks, then shared
    first_moment = [torch.cat([s["optimizer"]["state"][i]["exp_avg"].reshape(-1) for i in ids])
                    for s in (one, two)]
    diff = (first_moment[1] - first_moment[0]).norm() / first_moment[0].norm()
    assert diff < GRAD_RTOL, diff
    for name, tensor in one["model"].items():
        if "running_" in name:  # BatchNorm over the whole batch: the ranks' statistics merged
            torch.testing.assert_close(two["model"][name], tensor, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("mode", ["blocks", "data"])
def test_lm_matches_one_process_and_resumes_in_one(word_shards, tmp_path, mode):
    lm = [*LM, "--data-dir", str(word_shards)]
    code, out, err = torchrun([*lm, "--max-steps", "2", "--parallel", mode,
                               "--out", str(tmp_path / "two")])
    assert code == 0, err
    single([*lm, "--max-steps", "2", "--out", str(tmp_path / "one")])
    two, one = state(tmp_path / "two"), state(tmp_path / "one")
    assert_same_parameters(one, two)
    assert two["batches"] == one["batches"]  # the stream's position in single-process windows
    assert two["progress"]["history"][-1]["val_loss"] == \
        pytest.approx(one["progress"]["history"][-1]["val_loss"], rel=1e-5)
    single(["--task", "lm", "--resume", str(tmp_path / "two"), "--max-steps", "4",
            "--parallel", "none", "--no-progress"])
    single([*lm, "--max-steps", "4", "--out", str(tmp_path / "one4")])
    assert_same_parameters(state(tmp_path / "one4"), state(tmp_path / "two"))


def test_one_process_checkpoint_resumes_in_two(word_shards, tmp_path):
    lm = [*LM, "--data-dir", str(word_shards)]
    single([*lm, "--max-steps", "2", "--out", str(tmp_path / "run")])
    code, out, err = torchrun(["--task", "lm", "--resume", str(tmp_path / "run"), "--max-steps",
                               "4", "--parallel", "data", "--no-progress"])
    assert code == 0, err
    assert "resuming" in out
    single([*lm, "--max-steps", "4", "--out", str(tmp_path / "one4")])
    assert_same_parameters(state(tmp_path / "one4"), state(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_ranks"] == 2 and summary["steps"] == 4


def test_blocks_times_data_on_four_processes(word_shards, tmp_path):
    lm = [*LM, "--data-dir", str(word_shards), "--max-steps", "2"]
    code, out, err = torchrun([*lm, "--parallel", "blocks+data", "--block-ranks", "2",
                               "--out", str(tmp_path / "four")], nproc=4)
    assert code == 0, err
    assert "4 processes = 2 block ranks x 2 data ranks" in out
    single([*lm, "--out", str(tmp_path / "one")])
    assert_same_parameters(state(tmp_path / "one"), state(tmp_path / "four"))


# -- failures end every rank -------------------------------------------------------------------
def test_mismatched_world_size_is_one_line_on_every_rank(tmp_path):
    start = time.monotonic()
    code, out, err = torchrun([*IMAGE, "--epochs", "1", "--parallel", "blocks+data",
                               "--block-ranks", "3", "--out", str(tmp_path / "r")])
    assert code != 0 and time.monotonic() - start < 60
    for rank in (0, 1):
        assert f"error: rank {rank}: world size 2 is not a multiple of --block-ranks 3" in err
    assert "noprop_fast/" not in err  # no worker traceback (the launcher prints its own summary)


WORKER = textwrap.dedent("""
    import sys, time
    import torch
    from noprop_fast.config import ImageConfig, resolve
    from noprop_fast.distributed import session
    from noprop_fast.errors import UserError, cli_main

    def run(argv):
        cfg = resolve(None, {"parallel": "data", "dist_timeout": 5.0, "device": "cpu"},
                      cls=ImageConfig)
        with session(cfg) as (layout, groups):
            if layout.rank == 1:
                if argv[0] == "fail":
                    raise UserError("rank 1: failed on purpose")
                time.sleep(120)  # hangs: never joins the collective below
            torch.distributed.all_reduce(torch.ones(1))

    sys.exit(cli_main(run, sys.argv[1:], interrupted="interrupted"))
""")


@pytest.mark.parametrize("how", ["fail", "hang"])
def test_a_failed_or_hung_rank_ends_the_others(tmp_path, how):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    start = time.monotonic()
    code, out, err = torchrun([str(script), how], module=None, timeout=90)
    assert code != 0
    assert time.monotonic() - start < 60  # a 5 s time-out, not the 120 s hang
    assert "error: rank 0: a collective failed" in err
    if how == "fail":
        assert "error: rank 1: failed on purpose" in err
    else:
        assert "error: rank 1: stopped by the launcher" in err
