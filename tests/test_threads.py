"""The CPU thread rule (threads.py): the entry points ask for passive OpenMP waiting before torch
loads, unless the user chose a wait policy; `--threads N` and OMP_NUM_THREADS set the count and the
header says which; a run replays exactly at a given count; a bad count is a one-line error."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noprop_fast import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--num-blocks", "2", "--batch-size", "256", "--epochs", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """--threads sets torch's count for the whole process: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **extra}


@pytest.mark.parametrize("module", ["noprop_fast.train", "noprop_fast.compare"])
@pytest.mark.parametrize("user, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                            ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_entry_points_ask_for_passive_waiting_before_torch_loads(module, user, expected):
    """Importing an entry point sets OMP_WAIT_POLICY=PASSIVE before torch is imported (the OpenMP
    runtime reads it once, when torch loads it), and leaves a policy the user chose alone."""
    probe = (f"import sys, os, {module}; "
             "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], env=clean_env(**user), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    policy, torch_loaded = out.stdout.split()
    assert policy == str(expected) and torch_loaded == "True"


def test_header_names_the_count_and_where_it_comes_from(tmp_path):
    """A run from the command line: one thread per core with sleeping waiters by default, the
    environment's count when OMP_NUM_THREADS is set, --threads over both."""
    def header(*args, **env):
        out = subprocess.run([sys.executable, "-m", "noprop_fast.train", *TINY, *args,
                              "--out", str(tmp_path / f"r{len(list(tmp_path.iterdir()))}")],
                             env=clean_env(**env), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()[0]

    default = re.search(r"device cpu \((\d+) threads?: ([^)]*)\)", header())
    cores = int(default[1])
    assert default[2] == ("one per core, waiting threads sleep" if cores > 1 else "one per core")
    assert "device cpu (1 thread: OMP_NUM_THREADS=1)" in header(OMP_NUM_THREADS="1")
    assert "device cpu (1 thread: --threads)" in header("--threads", "1", OMP_NUM_THREADS="2")


def test_threads_sets_the_count_and_the_run_replays(tmp_path, capsys):
    for name in ("a", "b"):
        train.run([*TINY, "--threads", "1", "--out", str(tmp_path / name)])
        assert torch.get_num_threads() == 1
        assert "device cpu (1 thread: --threads)" in capsys.readouterr().out.splitlines()[0]
    a, b = ((tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in "ab")
    keys = ("epoch", "train_loss", "block_losses", "test_accuracy")
    assert [{k: json.loads(r)[k] for k in keys} for r in a] == \
           [{k: json.loads(r)[k] for k in keys} for r in b]


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_a_bad_thread_count_is_one_line(value, capsys):
    assert train.main([*TINY, "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0] and "at least 1" in err[0]


def test_thread_benchmark_runs_end_to_end(tmp_path):
    """profiling/bench_threads.py at its smallest: two rules, the image workload, idle and with a
    core kept busy; every run ok, the report has a row per rule, the spinning process is gone."""
    out = tmp_path / "bt"
    cmd = [sys.executable, str(ROOT / "profiling" / "bench_threads.py"), "--tiny", "--epochs", "1",
           "--rules", "passive,one", "--workloads", "image", "--busy-seconds", "300",
           "--out", str(out)]
    done = subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {f"{r}/image/{c}" for r in ("passive", "one")
                                    for c in ("idle", "busy")}
    for run in results["runs"].values():
        assert run["status"] == "ok" and run["figure"] > 0 and run["unit"] == "s per epoch"
    assert "1 thread: --threads" in results["runs"]["one/image/busy"]["header"]
    assert "waiting threads sleep" in results["runs"]["passive/image/idle"]["header"] or \
        "1 thread" in results["runs"]["passive/image/idle"]["header"]  # a one-core machine
    rows = [line for line in (out / "report.md").read_text().splitlines()
            if line.startswith("| passive") or line.startswith("| one")]
    assert len(rows) == 2
    spinners = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if "end = time.monotonic() + 300.0" in cmdline.read_bytes().decode(errors="replace"):
                spinners.append(cmdline.parent.name)
        except OSError:  # a process that ended meanwhile
            pass
    assert spinners == []
