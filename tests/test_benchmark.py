"""profiling/benchmark.py end to end at --quick sizes (T=2, batch 8, one round of one step, tiny
head shapes, no torch.compile) on the CPU: both files written, every section's figures present,
timings positive and finite. Where the C++ fused ops load, the fused figures must be there too; where
they do not, each fused figure must say "unavailable: <reason>" instead.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import noprop_fast.cpu_ops as cpu_ops

SCRIPT = Path(__file__).resolve().parent.parent / "profiling" / "benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("noprop_profiling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    code = load_script().main(["--quick", "--device", "cpu", "--out", str(out)])
    return code, out


def test_quick_run_writes_every_figure(quick_run):
    code, out = quick_run
    assert code == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    fused_available, reason = cpu_ops.available()

    header = results["header"]
    for key in ("device_name", "threads", "torch", "triton", "python", "precision", "date", "command"):
        assert header[key] not in (None, ""), key
    assert "--quick" in header["command"] and "CPU numbers" in report

    # the step: three paths; the reference timed, compile skipped at --quick
    step = results["step"]
    assert step["config"]["num_blocks"] == 2 and step["config"]["rounds"] == 1
    ref = step["paths"]["reference"]
    assert ref["status"] == "ok" and all(positive(v) for v in ref["images_per_second"])
    assert positive(ref["median"]) and math.isfinite(ref["last_loss"])
    assert step["paths"]["compiled"]["status"].startswith("skipped")
    fused = step["paths"]["fused"]
    if fused_available:
        assert fused["status"] == "ok" and positive(fused["median"])
        assert positive(step["ratios"]["fused/reference"])
    else:
        assert fused["status"] == f"unavailable: {reason}" and "median" not in fused

    # the ops: all four, forward and forward+backward each
    rows = results["ops"]
    assert {r["op"] for r in rows} == {"noise_injection", "block_loss", "block_linear", "softmax_head"}
    assert {r["pass"] for r in rows} == {"forward", "forward+backward"}
    assert {r["op"] for r in rows if r["gradients"] != "torch.autograd.grad"} == {
        "block_linear", "softmax_head"}  # those two: into .grad, as the model's step
    for r in rows:
        assert positive(r["reference_ms"]) and positive(r["work"]), r
        if fused_available:
            assert r["fused_status"] == "ok" and positive(r["fused_ms"]), r
            assert positive(r["fused/reference"]), r
        else:
            assert r["fused_status"].startswith("unavailable: ") and r["fused_ms"] is None, r

    # the head's memory: the reference always; the fused op where it loads
    memory = results["memory"]
    assert memory["ref"]["status"] == "ok" and memory["ref"]["peak_bytes"] > 0
    assert memory["ref"]["largest_tensor_bytes"] >= memory["logits_bytes"]  # it holds the logits
    if fused_available:
        assert memory["fused"]["status"] == "ok" and memory["fused"]["peak_bytes"] >= 0
        assert "fused/reference" in memory
    else:
        assert memory["fused"]["status"].startswith("unavailable: ")


def test_bad_section_is_one_line_and_nonzero(tmp_path, capsys):
    code = load_script().main(["--sections", "steps", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --sections") and "\n" not in err
    assert not (tmp_path / "report.md").exists()


def test_linear_and_head_take_parameter_slices_and_fill_grad():
    """block_linear and softmax_head are measured as the model calls them: the weight and bias (k
    and c) are leaf nn.Parameters the op receives sliced, and forward + backward leaves one call's
    gradient in every leaf's .grad (set to None before each call, so a second call does not add)."""
    load_script()  # puts profiling/ on sys.path
    import bench_common
    import bench_ops
    cases = [c for c in bench_ops.op_cases(bench_common.QUICK, torch.device("cpu"), torch.float32,
                                           None) if c.op in ("block_linear", "softmax_head")]
    assert {c.op for c in cases} == {"block_linear", "softmax_head"}
    for case in cases:
        assert case.gradients == bench_ops.INTO_GRAD
        params = [t for t in case.inputs.values() if isinstance(t, torch.nn.Parameter)]
        leaves = [t for t in case.inputs.values() if t.requires_grad]
        assert len(params) == 2 and len(leaves) == len(case.inputs), case.shape
        assert all(t.is_leaf and t.grad is None for t in leaves), case.shape
        step = bench_ops.pass_fn(case.reference, case.inputs, True, case.gradients)
        step()
        first = [t.grad.clone() for t in leaves]
        assert all(g.shape == t.shape and g.abs().sum() > 0 for g, t in zip(first, leaves))
        step()
        for g, t in zip(first, leaves):
            torch.testing.assert_close(t.grad, g, rtol=0, atol=0)
