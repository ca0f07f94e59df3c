"""profiling/bench.py end to end at --quick sizes (T=2, batch 8, one round of one step, tiny
head shapes, no torch.compile) on the CPU: both files written, every section's figures present,
timings positive and finite. Where the C++ fused ops load, the fused figures must be there too; where
they do not, each fused figure must say "unavailable: <reason>" instead.

The loop section's separate-modules step is held to `noprop_loss`: same weights and noise, same
per-block losses and cross-entropy; and both of its paths must move every block's weights.
"""
import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import noprop_fast.cpu_ops as cpu_ops

SCRIPT = Path(__file__).resolve().parent.parent / "profiling" / "bench.py"


def load_script():
    spec = importlib.util.spec_from_file_location("noprop_profiling_bench", SCRIPT)
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


# ------------------------------------------------------------------------------------------------
# The loop section and the methods-memory section

def loop_setup(num_blocks=3, batch=16):
    """A small MNIST-shaped model without dropout (so both forms see the same activations), its
    schedule, and its copy as separate modules."""
    load_script()  # puts profiling/ on sys.path
    import bench_common
    import bench_loop
    from noprop_fast.schedule import NoiseSchedule
    sizes = dataclasses.replace(bench_common.QUICK, num_blocks=num_blocks, batch=batch)
    cfg, model, x, y = bench_common.mnist_model(sizes, torch.device("cpu"), dropout=0.0)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta)
    return bench_loop, cfg, model, x, y, schedule, bench_loop.separate_model_from(model, cfg)


def test_loop_objective_equals_noprop_loss():
    """Same weights, same noise (one Philox stream, drawn in noprop_loss's order: the blocks'
    [T, N, d], then z_T's [1, N, d]): the loop's per-block losses and CE are noprop_loss's."""
    from noprop_fast.fused import PhiloxNoise
    from noprop_fast.layers import ALL_BLOCKS
    from noprop_fast.methods import noprop_loss
    bench_loop, cfg, model, x, y, schedule, loop = loop_setup()
    T, n, d = cfg.num_blocks, x.shape[0], model.embedding.dim
    loss, parts = noprop_loss(model, schedule, x, y, ALL_BLOCKS, PhiloxNoise(7, x.device))
    stream = PhiloxNoise(7, x.device)
    eps = stream.normals((T, n, d), x.device)
    eps_clean = stream.normals((1, n, d), x.device)[0]
    block_losses, ce = bench_loop.loop_step(loop, schedule, x, y, eps, eps_clean)
    assert block_losses.shape == (T,) and bool((block_losses > 0).all())
    torch.testing.assert_close(block_losses, parts["block_losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, parts["ce"], rtol=1e-5, atol=1e-6)
    total = (schedule.snr_weights * block_losses).sum() + ce + parts["kl"]
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    # other noise, other losses: the comparison above can fail
    other, _ = bench_loop.loop_step(bench_loop.separate_model_from(model, cfg), schedule, x, y,
                                    torch.randn_like(eps), eps_clean)
    assert not torch.allclose(other, parts["block_losses"], rtol=1e-3, atol=1e-4)


def test_loop_and_batched_steps_update_every_block():
    from noprop_fast.layers import block_parameters
    from noprop_fast.optim import make_optimizer
    from noprop_fast.trainer import train_step
    bench_loop, cfg, model, x, y, schedule, loop = loop_setup()
    batched = copy.deepcopy(model)
    stacked_before = [p.detach().clone() for p in block_parameters(batched)]
    loop_before = [[p.detach().clone() for p in block.parameters()] for block in loop.blocks]
    classifier_before = loop.classifier.weight.detach().clone()
    train_step(batched, make_optimizer(batched, cfg), schedule, x, y)
    bench_loop.loop_step(loop, schedule, x, y)
    for t in range(cfg.num_blocks):
        for before, p in zip(stacked_before, block_parameters(batched)):
            assert not torch.equal(before[t], p.detach()[t]), (t, tuple(p.shape))
        for before, p in zip(loop_before[t], loop.blocks[t].parameters()):
            assert not torch.equal(before, p.detach()), (t, tuple(p.shape))
    assert not torch.equal(classifier_before, loop.classifier.weight.detach())


@pytest.fixture(scope="module")
def new_sections_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-new-sections")
    argv = ["--quick", "--device", "cpu", "--sections", "loop,methods-memory", "--out", str(out)]
    return load_script().main(argv), out


def test_quick_new_sections_write_report_and_keys(new_sections_run):
    code, out = new_sections_run
    assert code == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"header", "loop", "methods-memory"}
    assert "## Batched step against T separate modules in a loop (CPU numbers)" in report
    assert "## Activation memory per method, one training step (MiB) (CPU numbers)" in report
    header = results["header"]
    assert "--sections loop,methods-memory" in header["command"]
    assert set(header["section_seconds"]) == {"loop", "methods-memory"}

    loop = results["loop"]
    assert loop["config"]["num_blocks"] == 2 and loop["config"]["batch"] == 8
    for name in ("batched", "loop"):
        path = loop["paths"][name]
        assert all(positive(v) for v in path["images_per_second"]) and positive(path["median"])
    assert loop["batched/loop"] == pytest.approx(loop["paths"]["batched"]["median"]
                                                 / loop["paths"]["loop"]["median"])

    mem = results["methods-memory"]
    assert set(mem["bytes"]) == {"noprop-all", "noprop-sequential", "backprop"}
    assert all(positive(v) for v in mem["bytes"].values())
    assert len(mem["sequential_per_block_bytes"]) == 2
    assert mem["bytes"]["noprop-sequential"] == max(mem["sequential_per_block_bytes"])
    for name, value in mem["bytes"].items():
        assert mem["ratios"][f"{name}/backprop"] == pytest.approx(value / mem["bytes"]["backprop"])
    assert mem["paper_table2_gb"] == {"backprop": 0.87, "noprop-dt": 0.49,
                                      "noprop-dt/backprop": pytest.approx(0.49 / 0.87)}
    assert isinstance(mem["meets_bar"], bool) and mem["bar_applies"] is False
    assert "(issue acceptance)" in report


def test_sequential_memory_below_all_blocks(new_sections_run):
    _, out = new_sections_run
    saved = json.loads((out / "results.json").read_text())["methods-memory"]["bytes"]
    assert saved["noprop-sequential"] < saved["noprop-all"]
