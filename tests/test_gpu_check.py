"""profiling/gpu_check.sh, the one command for a GPU: its dry run from a fresh copy with nothing
installed, and the parts of a real run that a CPU can check (time limits, independent sections,
the export, the pytest summary, the kernel rows' matching)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "profiling" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh_copy(dest: Path, folders=("noprop_fast", "kernels", "csrc", "profiling", "tests")) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "results", ".hypothesis", "*.egg-info")
    for folder in folders:
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    shutil.copy(ROOT / "pytest.ini", dest / "pytest.ini")
    return dest


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "OUT")}


def test_the_engine_imports_from_a_checkout_with_nothing_installed(tmp_path):
    """noprop_fast.kernels and noprop_fast.csrc are the checkout's kernels/ and csrc/, also where an
    installed noprop_fast exists elsewhere (they must come from the same copy as noprop_fast)."""
    copy = fresh_copy(tmp_path / "copy", ("noprop_fast", "kernels", "csrc"))
    code = ("import noprop_fast, noprop_fast.kernels.noise as n, noprop_fast.csrc as c; "
            "print(noprop_fast.__file__); print(n.__file__); print(c.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=copy, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    paths = done.stdout.split()
    assert len(paths) == 3 and all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths), paths


def test_the_dry_run_passes_from_a_fresh_copy(tmp_path):
    copy = fresh_copy(tmp_path / "copy")
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(copy / "profiling" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env={**clean_env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["run"]["sections"]
    assert list(sections) == ["env", "tests", "kernels", "bench-mnist", "bench-fineweb", "nsys"]
    assert all(s["status"] == "ok (dry run)" for s in sections.values()), sections
    assert all(Path(f).resolve().is_relative_to(copy.resolve()) for f in results["env"]["engine"].values())
    assert "gpu-marked:" in sections["tests"]["detail"] and results["run"]["command"].startswith(
        "profiling/gpu_check.sh --dry-run")
    assert "| nsys | ok (dry run) |" in (out / "report.md").read_text()


def test_the_dry_run_fails_on_a_broken_command_line(tmp_path, monkeypatch):
    gpu_check = load("gpu_check")
    monkeypatch.setitem(gpu_check.BENCH, "bench-mnist", ["--sections", "step", "--rounds", "0"])
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--sections", "bench-mnist,nsys"])
    sections = json.loads((tmp_path / "results.json").read_text())["run"]["sections"]
    assert rc == 1 and sections["bench-mnist"]["status"] == "failed"
    assert "--rounds" in sections["bench-mnist"]["detail"]
    assert sections["nsys"]["status"] == "ok (dry run)"  # the next section still ran


def test_a_command_past_its_time_limit_is_stopped(tmp_path):
    gpu_check = load("gpu_check")
    log = tmp_path / "log"
    code = ("import subprocess, sys, time; "  # a child that sleeps too: the whole group ends
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    r = gpu_check.run_command([sys.executable, "-c", code], log, timeout=2)
    assert r["timed_out"] and r["rc"] is not None and r["seconds"] < 20
    assert "stopped at the time limit" in log.read_text()


def test_sections_fail_independently_and_the_export_is_three_files(tmp_path, monkeypatch):
    gpu_check = load("gpu_check")

    def broken(ctx):
        raise RuntimeError("planted")

    def fine(ctx):
        (ctx.out / "logs").mkdir(exist_ok=True)
        (ctx.out / "logs" / "kernels.log").write_text("x" * 100)
        ctx.results["kernels"] = [{"config": "mnist", "op": "noise", "kernel": "noise_fwd[bf16]",
                                   "layer": "z_t", "count": 2, "roofline_us": 1.0, "bound": "memory",
                                   "status": "ok", "measured_us": 4.0, "tflops": 0.1, "gbs": 800.0,
                                   "fraction": 0.25}]
        return {"status": "passed", "detail": "1 of 1 kernel rows timed"}

    monkeypatch.setattr(gpu_check, "SECTIONS", [("env", 30), ("kernels", 30)])
    monkeypatch.setattr(gpu_check, "RUNNERS", {"env": broken, "kernels": fine})
    out, dest = tmp_path / "gpu-x", tmp_path / "export"
    rc = gpu_check.main(["--out", str(out), "--export", str(dest), "--sections", "env,kernels"])
    assert rc == 1
    sections = json.loads((out / "results.json").read_text())["run"]["sections"]
    assert sections["env"]["status"] == "failed" and "planted" in sections["env"]["detail"]
    assert sections["kernels"]["status"] == "passed"
    report = (out / "report.md").read_text()
    assert "| `noise_fwd[bf16]` | z_t | 2 | 4 | 1 | memory | 0.1 | 800 | 0.25 | ok |" in report
    assert "0.008 ms measured against 0.002 ms of roofline (0.25 of the roofline)" in report
    exported = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert exported == ["gpu-x/gpu-x.tar.gz", "gpu-x/report.md", "gpu-x/results.json"]
    with tarfile.open(dest / "gpu-x" / "gpu-x.tar.gz") as tar:
        assert {"gpu-x/report.md", "gpu-x/logs/kernels.log"} <= set(tar.getnames())


def test_the_pytest_summary(tmp_path):
    report = load("gpu_check_report")
    log = tmp_path / "tests.log"
    log.write_text("tests/a.py::test_x[bf16] PASSED\nFAILED tests/a.py::test_y - assert 1\n"
                   "==== 1 failed, 3 passed, 2 skipped, 880 deselected in 12.50s ====\n[exit 1, 13.0 s]\n")
    s = report.pytest_summary(log)
    assert s["counts"] == {"failed": 1, "passed": 3, "skipped": 2, "deselected": 880}
    assert s["failed"] == ["tests/a.py::test_y"]
    log.write_text("[gw0] [ 10%] PASSED tests/a.py::test_x\n[gw1] [ 20%] FAILED tests/a.py::test_y\n"
                   "[gw0] [ 30%] PASSED tests/a.py::test_z\n[exit -15, stopped at the time limit]\n")
    s = report.pytest_summary(log)
    assert s["counts"]["passed"] == 2 and s["counts"]["failed"] == 1 and "stopped" in s["line"]
    assert s["failed"] == ["tests/a.py::test_y"]


def test_the_nvtx_ranges_are_read_off_the_stats_not_the_command_line(tmp_path):
    report = load("gpu_check_report")
    stats = tmp_path / "stats.txt"
    stats.write_text("$ nsys stats --report nvtx_sum,cuda_gpu_kern_sum train.nsys-rep\n"
                     " ** NVTX Range Summary (nvtx_sum):\n 40.1  12  :forward\n 30.2  12  :backward\n"
                     " ** CUDA GPU Kernel Summary (cuda_gpu_kern_sum):\n 10.0  _fwd  loss\n")
    assert report.nvtx_ranges(stats) == ["forward", "backward"]
    stats.write_text("$ nsys stats --report nvtx_sum,cuda_gpu_kern_sum train.nsys-rep\n"
                     " ** NVTX Range Summary (nvtx_sum):\n"
                     "SKIPPED: does not contain NV Tools Extension data\n")
    assert report.nvtx_ranges(stats) == []


def test_kernel_rows_are_matched_by_name_and_launch_order():
    times = load("gpu_kernel_times")
    calls = [SimpleNamespace(kernel=k) for k in ("block_linear_fwd_bf16[128x128x32,w8,s3]",
                                                  "block_linear_dx_bf16[64x64x32,w4,s4]",
                                                  "block_linear_dw_bf16[64x64x32,w4,s4]",
                                                  "block_linear_bias_grad_bf16")]
    one = [("_batched_matmul_kernel", 5.0), ("void at::native::fill", 1.0), ("_bias_grad_kernel", 2.0),
           ("_batched_matmul_kernel", 7.0), ("_batched_matmul_kernel_0d1d2d", 9.0)]
    events = one + [(n, d + 1) for n, d in one]
    assert times.assign_durations(calls, events, iters=2) == [[5, 6], [7, 8], [9, 10], [2, 3]]
    with pytest.raises(RuntimeError, match="expected 4 x 2 kernel launches"):
        times.assign_durations(calls, events[:-1], iters=2)
    with pytest.raises(KeyError, match="no Triton function"):
        times.kernel_function(SimpleNamespace(kernel="made_up_kernel[bf16]"))


def test_the_export_leaves_out_files_too_large_to_return(tmp_path):
    report = load("gpu_check_report")
    out = tmp_path / "gpu-x"
    (out / "nsys").mkdir(parents=True)
    (out / "report.md").write_text("# GPU check\n")
    (out / "nsys" / "train.sqlite").write_bytes(os.urandom(8 * 2 ** 20))  # over half the limit
    left_out = report.export(out, tmp_path / "export")
    assert left_out == ["nsys/train.sqlite"]
    with tarfile.open(tmp_path / "export" / "gpu-x" / "gpu-x.tar.gz") as tar:
        assert tar.getnames() == ["gpu-x/report.md"]


def test_no_export_onto_the_folder_itself(tmp_path, monkeypatch):
    gpu_check = load("gpu_check")
    monkeypatch.setattr(gpu_check, "SECTIONS", [("env", 30)])
    monkeypatch.setattr(gpu_check, "RUNNERS", {"env": lambda ctx: {"status": "passed"}})
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--out", str(tmp_path / "gpu-x"), "--sections", "env"]) == 0
    assert sorted(p.name for p in (tmp_path / "gpu-x").iterdir()) == ["report.md", "results.json"]


@pytest.mark.interpreter
def test_every_group_runs_its_fused_op_forward_and_backward_under_the_interpreter():
    """The inputs gpu_kernel_times builds for each kind of row, at small shapes, through the real
    fused ops (Triton's interpreter on the CPU): the same code path the GPU run times."""
    pytest.importorskip("triton")
    code = """
import sys, torch
sys.path.insert(0, "profiling")
import gpu_kernel_times as g
cases = [("linear_calls", dict(layer="x", B=2, N=5, K=16, M=8, count=1, need_dx=True)),
         ("linear_calls", dict(layer="x", B=2, N=5, K=16, M=8, count=1, need_dx=False)),
         ("head_calls", dict(B=2, N=5, m=7, D=16, d=8)),
         ("attention_calls", dict(Z=2, H=2, L=8, Dh=16, count=1)),
         ("noise_calls", dict(B=2, N=5, m=7, d=8, backward=True)),
         ("noise_calls", dict(B=2, N=5, m=7, d=8, backward=False)),
         ("loss_calls", dict(B=2, N=5, d=8))]
for builder, args in cases:
    g.group_runner(builder, args, "cpu", torch.float32)()
    print(builder, "ran")
"""
    env = {**clean_env(), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ran") == 7
