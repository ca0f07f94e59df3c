"""profiling/bench.py end to end at --tiny sizes (T=2, batch 8, a tiny language model, one round
of one step, tiny head shapes, --no-compile) on the CPU: report, JSON and plot written, every
section's figures present, timings positive and finite, each ratio the quotient of the figures it
names. Where the C++ fused ops load, the fused figures must be there too; where they do not, each
fused figure must say "unavailable: <reason>" instead. Without CUDA the graphs rows say "CUDA only"
and carry no figure.

The separate-modules loops (image and language) are held to `noprop_loss` / `lm_loss`: same
weights and noise, same per-block losses, cross-entropy and total; and every path must move every
block's weights. The timing helper is checked on fake steps: ratios per round, failures isolated.
"""
import copy
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import noprop_fast.ops.cpp as cpu_ops

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
    code = load_script().main(["--tiny", "--no-compile", "--device", "cpu", "--out", str(out)])
    return code, out


def check_throughput(result: dict, fused_available: bool, reason: str) -> None:
    """One task's table on the CPU without compile: loop, reference and fused timed (fused where
    it loads), graphs "CUDA only", compile skipped; every ratio the per-round quotient."""
    assert set(result["paths"]) == {"loop", "reference", "fused", "graphs", "compiled"}
    ref = result["paths"]["reference"]
    timed = ["loop", "reference"] + (["fused"] if fused_available else [])
    for name in timed:
        p = result["paths"][name]
        assert p["status"] == "ok", name
        assert all(positive(v) for v in p["per_second"]) and positive(p["median"]), name
        assert math.isfinite(p["last_loss"]) and p["last_loss"] > 0, name
        assert p["vs_reference"] == pytest.approx([a / b for a, b in
                                                   zip(p["per_second"], ref["per_second"])])
        assert p["ratio_min"] <= p["ratio"] <= p["ratio_max"], name
    assert ref["ratio"] == 1.0
    if not fused_available:
        assert result["paths"]["fused"]["status"] == f"unavailable: {reason}"
    for name, status in (("graphs", "CUDA only"), ("compiled", "skipped (--no-compile)")):
        assert result["paths"][name] == {"status": status}, name
    assert result["config"]["rounds"] == 1


def test_quick_run_writes_every_figure(quick_run):
    code, out = quick_run
    assert code == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    fused_available, reason = cpu_ops.available()

    header = results["header"]
    for key in ("device_name", "threads", "torch", "triton", "python", "precision", "date", "command"):
        assert header[key] not in (None, ""), key
    assert "--tiny" in header["command"] and "CPU numbers" in report
    assert set(header["section_seconds"]) == {"step", "lm", "ops", "memory", "methods-memory",
                                              "lm-memory"}

    # the two tasks' tables: five rows each
    step, lm = results["step"], results["lm"]
    assert step["config"]["num_blocks"] == 2 and step["unit"] == "images/s"
    check_throughput(step, fused_available, reason)
    assert lm["config"]["num_blocks"] == 2 and lm["unit"] == "tokens/s"
    assert lm["config"]["tokens_per_step"] == lm["config"]["batch"] * lm["config"]["seq_len"]
    check_throughput(lm, fused_available, reason)
    assert "## Image task: training step throughput (CPU numbers)" in report
    assert "## Language task: training step throughput (CPU numbers)" in report
    assert report.count("batched reference / separate-modules loop = ") == 2
    assert report.count("| fused + CUDA graphs | - |") == 2

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


def test_quick_run_writes_the_plot(quick_run):
    pytest.importorskip("matplotlib")
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["header"]["plot"] == "bench.png"
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "| plot | bench.png" in (out / "report.md").read_text()


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
    cases = [c for c in bench_ops.op_cases(bench_common.TINY, torch.device("cpu"), torch.float32,
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
# The separate-modules loops, the timing helper and the memory sections

def loop_setup(num_blocks=3, batch=16):
    """A small MNIST-shaped model without dropout (so both forms see the same activations), its
    schedule, and its copy as separate modules."""
    load_script()  # puts profiling/ on sys.path
    import bench_common
    import bench_loop
    from noprop_fast.schedule import NoiseSchedule
    sizes = dataclasses.replace(bench_common.TINY, num_blocks=num_blocks, batch=batch)
    cfg, model, x, y = bench_common.mnist_model(sizes, torch.device("cpu"), dropout=0.0)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta)
    return bench_loop, cfg, model, x, y, schedule, bench_loop.separate_model_from(model, cfg)


def test_loop_objective_equals_noprop_loss():
    """Same weights, same noise (one Philox stream, drawn in noprop_loss's order: the blocks'
    [T, N, d], then z_T's [1, N, d]): the loop's per-block losses, CE and total are
    noprop_loss's."""
    from noprop_fast.ops import PhiloxNoise
    from noprop_fast.layers import ALL_BLOCKS
    from noprop_fast.noprop import noprop_loss
    bench_loop, cfg, model, x, y, schedule, loop = loop_setup()
    T, n, d = cfg.num_blocks, x.shape[0], model.embedding.dim
    loss, parts = noprop_loss(model, schedule, x, y, ALL_BLOCKS, PhiloxNoise(7, x.device))
    stream = PhiloxNoise(7, x.device)
    eps = stream.normals((T, n, d), x.device)
    eps_clean = stream.normals((1, n, d), x.device)[0]
    block_losses, ce, total = bench_loop.loop_step(loop, schedule, x, y, eps, eps_clean)
    assert block_losses.shape == (T,) and bool((block_losses > 0).all())
    torch.testing.assert_close(block_losses, parts["block_losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, parts["ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    # other noise, other losses: the comparison above can fail
    other, _, _ = bench_loop.loop_step(bench_loop.separate_model_from(model, cfg), schedule, x, y,
                                       torch.randn_like(eps), eps_clean)
    assert not torch.allclose(other, parts["block_losses"], rtol=1e-3, atol=1e-4)


def test_loop_and_batched_steps_update_every_block():
    from noprop_fast.layers import block_parameters
    from noprop_fast.optim import make_optimizer
    from noprop_fast.tasks.image import train_step
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


def lm_setup(num_blocks=3):
    """A tiny NoProp-LM (learned W_embed), its schedule, one batch, and its separate-modules copy.

    At GPT-2's initialisation (N(0, 0.02)) the head's logits are near zero, so u_hat is close to
    the mean embedding whatever z and the block are, and a loss comparison could not tell them
    apart: the stacked weights are redrawn larger (per block, so the blocks differ) first."""
    load_script()
    import bench_common
    import bench_lm
    from noprop_fast.schedule import NoiseSchedule
    shape = dataclasses.replace(bench_common.TINY_LM, num_blocks=num_blocks, batch=3, seq_len=7,
                                vocab_size=41)
    cfg, model, x, y = bench_lm.lm_model(shape, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.blocks.parameters():
            if p.dim() == 3:  # [T, out, in] weights and [T, rows, D] tables
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta)
    return bench_lm, cfg, model, x, y, schedule, bench_lm.separate_lm_from(model, cfg)


def test_lm_loop_objective_equals_lm_loss():
    """The language loop on the same weights and noise as lm_loss (N*L = 21 rows, noise drawn in
    noprop_loss's order): the same per-block losses, CE and total objective."""
    from noprop_fast.ops import PhiloxNoise
    from noprop_fast.tasks.language import lm_loss
    bench_lm, cfg, model, x, y, schedule, loop = lm_setup()
    T, rows, d = cfg.num_blocks, x.numel(), model.embedding.dim
    assert len(loop.blocks) == T and all(b.num_blocks == 1 for b in loop.blocks)
    loss, parts = lm_loss(model, schedule, x, y, noise=PhiloxNoise(11, x.device))
    stream = PhiloxNoise(11, x.device)
    eps = stream.normals((T, rows, d), x.device)
    eps_clean = stream.normals((1, rows, d), x.device)[0]
    block_losses, ce, total = bench_lm.lm_loop_step(loop, schedule, x, y, eps, eps_clean)
    assert block_losses.shape == (T,) and bool((block_losses > 0).all())
    assert not torch.allclose(block_losses, block_losses.flip(0), rtol=1e-3)  # blocks differ
    torch.testing.assert_close(block_losses, parts["block_losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, parts["ce"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    other, _, _ = bench_lm.lm_loop_step(bench_lm.separate_lm_from(model, cfg), schedule, x, y,
                                        torch.randn_like(eps), eps_clean)
    assert not torch.allclose(other, parts["block_losses"], rtol=1e-3, atol=1e-4)


def test_lm_loop_updates_every_block_and_the_shared_part():
    bench_lm, cfg, model, x, y, schedule, loop = lm_setup()
    before = [[p.detach().clone() for p in block.parameters()] for block in loop.blocks]
    embedding_before = loop.embedding.weight.detach().clone()
    classifier_before = loop.classifier.weight.detach().clone()
    bench_lm.lm_loop_step(loop, schedule, x, y)
    for t, block in enumerate(loop.blocks):
        moved = [not torch.equal(b, p.detach()) for b, p in zip(before[t], block.parameters())]
        # the token and position tables move only in the rows the batch uses: compare whole tables
        assert all(moved), (t, [n for (n, _), m in zip(block.named_parameters(), moved) if not m])
    assert not torch.equal(embedding_before, loop.embedding.weight.detach())
    assert not torch.equal(classifier_before, loop.classifier.weight.detach())
    # the copies share no storage with the batched model
    assert loop.blocks[0].tok.weight.data_ptr() != model.blocks.tok.weight.data_ptr()


def test_measure_paths_isolates_failures_and_pairs_rounds():
    """Fake steps: a status string is not timed, a raising path becomes "failed: ..." and the
    others go on, and each ratio is path / reference within a round."""
    load_script()
    import bench_throughput
    calls = {"reference": 0, "half": 0}

    def reference():
        calls["reference"] += 1
        return torch.tensor(1.0)

    def half_speed():  # calls the reference's work twice: about half its rate
        calls["half"] += 1
        reference(), reference()
        return torch.tensor(2.0)

    def broken():
        raise RuntimeError("no kernel image\nsecond line")

    paths = {"reference": reference, "half": half_speed, "broken": broken, "graphs": "CUDA only"}
    out = bench_throughput.measure_paths(paths, 10, torch.device("cpu"), rounds=3, steps=2,
                                         warmup=2)
    assert out["graphs"] == {"status": "CUDA only"}
    assert out["broken"] == {"status": "failed: RuntimeError: no kernel image"}
    assert calls["half"] == 2 + 3 * 2
    for name in ("reference", "half"):
        p = out[name]
        assert p["status"] == "ok" and len(p["per_second"]) == 3 and len(p["warmup_seconds"]) == 2
        assert p["vs_reference"] == pytest.approx([a / b for a, b in zip(
            p["per_second"], out["reference"]["per_second"])])
        assert p["min"] <= p["median"] <= p["max"]
    assert out["half"]["last_loss"] == 2.0 and out["reference"]["ratio"] == 1.0


def test_captured_step_warms_captures_once_and_refuses_eager_fallback(monkeypatch):
    """The graphs row: the first call makes CapturedStep's uncaptured warm-up calls and the capture
    (all inside the first warm-up step), later calls replay; a step that was not captured raises
    instead of being timed as a graph. A stand-in CapturedStep, since this machine may have no
    CUDA."""
    load_script()
    import bench_throughput
    import noprop_fast.graphs as graphs

    class FakeCapturedStep:
        made = []

        def __init__(self, fn, example_inputs, device, warmup_steps=3, pool=None, warn=None):
            self.fn, self.warmup_left, self.calls, self.failed = fn, warmup_steps, 0, None
            self.captured = False
            FakeCapturedStep.made.append(self)

        def __call__(self, *inputs):
            self.calls += 1
            if self.warmup_left:
                self.warmup_left -= 1
            else:
                self.captured = not capture_fails
            return self.fn(*inputs)

    monkeypatch.setattr(graphs, "CapturedStep", FakeCapturedStep)
    x = torch.ones(3)
    capture_fails = False
    step = bench_throughput.captured(lambda t: t.sum(), (x,), torch.device("cpu"))
    assert float(step()) == 3.0 and len(FakeCapturedStep.made) == 1
    graph = FakeCapturedStep.made[0]
    assert graph.calls == 4 and graph.captured  # 3 warm-up calls, then the capture
    step(), step()
    assert graph.calls == 6 and len(FakeCapturedStep.made) == 1
    capture_fails = True
    failing = bench_throughput.captured(lambda t: t.sum(), (x,), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="capture failed"):
        failing()


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-memory")
    argv = ["--tiny", "--device", "cpu", "--sections", "methods-memory,lm-memory",
            "--out", str(out)]
    return load_script().main(argv), out


def test_memory_sections_write_report_and_keys(memory_run):
    code, out = memory_run
    assert code == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"header", "methods-memory", "lm-memory"}
    assert "## Memory per method, image task, one training step (MiB) (CPU numbers)" in report
    assert "## Memory per method, language task, one training step (MiB) (CPU numbers)" in report
    header = results["header"]
    assert "--sections methods-memory,lm-memory" in header["command"]
    assert set(header["section_seconds"]) == {"methods-memory", "lm-memory"}

    for name in ("methods-memory", "lm-memory"):
        mem = results[name]
        assert mem["kind"] == "cpu_saved_for_backward"
        assert set(mem["bytes"]) == {"noprop-all", "noprop-sequential", "backprop"}
        assert all(positive(v) for v in mem["bytes"].values())
        assert len(mem["sequential_per_block_bytes"]) == 2
        assert mem["bytes"]["noprop-sequential"] == max(mem["sequential_per_block_bytes"])
        for variant, value in mem["bytes"].items():
            assert mem["ratios"][f"{variant}/backprop"] == pytest.approx(
                value / mem["bytes"]["backprop"])
    mem = results["methods-memory"]
    assert mem["paper_table2_gb"] == {"backprop": 0.87, "noprop-dt": 0.49,
                                      "noprop-dt/backprop": pytest.approx(0.49 / 0.87)}
    assert isinstance(mem["meets_target"], bool) and mem["target_applies"] is False
    assert "NoProp-sequential / backprop = " in report
    assert "The engine's target, at most 0.15 at T = 10, batch 128" in report
    assert "is set for other sizes than this run." in report


def test_sequential_memory_below_all_blocks(memory_run):
    _, out = memory_run
    results = json.loads((out / "results.json").read_text())
    for name in ("methods-memory", "lm-memory"):
        saved = results[name]["bytes"]
        assert saved["noprop-sequential"] < saved["noprop-all"], name


def test_quick_sizes_are_the_mnist_config_at_t10():
    """--quick measures the loop ratio at the MNIST config and the methods' memory at T = 10, the
    figures a quick run is for; --tiny is smaller in every task."""
    load_script()
    import bench_common
    quick, full, tiny = bench_common.QUICK, bench_common.Sizes(), bench_common.TINY
    assert (quick.batch, quick.num_blocks, quick.image_shape) == (full.batch, 10, (1, 28, 28))
    assert quick.lm_cpu.tokens < full.lm_cpu.tokens and tiny.lm_cpu.tokens < quick.lm_cpu.tokens
    assert full.lm_cuda.config == "fineweb" and full.lm_cuda.vocab_size == 50257
    assert tiny.num_blocks < quick.num_blocks


@pytest.mark.parametrize("loop_vs_reference, verdict", [([0.8, 0.7], "met"), ([1.1, 1.2], "not met")])
def test_image_summary_states_the_target_only_at_the_mnist_config(loop_vs_reference, verdict):
    """The image table's last line says whether batched / loop > 1 (the median of the per-round
    inverses of loop / reference), and only at the MNIST config on a CPU, where the target is set."""
    load_script()
    import bench_report
    loop = {"status": "ok", "vs_reference": loop_vs_reference}
    config = {"image_shape": [1, 28, 28], "batch": 128, "num_blocks": 10, "embedding": "onehot",
              "num_classes": 10, "method": "noprop", "precision": "fp32", "rounds": 2,
              "steps_per_round": 1, "warmup_steps": 1}
    result = {"task": "image", "unit": "images/s", "config": config, "paths": {"loop": loop}}
    head = {"fused_ops": "C++ ops"}
    median = (1 / loop_vs_reference[0] + 1 / loop_vs_reference[1]) / 2  # of two rounds' inverses
    lines = "\n".join(bench_report.render_throughput(result, head, cpu=True))
    assert f"separate-modules loop = {median:.2f} " in lines
    assert ("The engine's target on a CPU at this config: above 1, the batched step faster than "
            f"T separate modules: {verdict}.") in lines
    small = dict(result, config=dict(config, num_blocks=2))
    assert "target" not in "\n".join(bench_report.render_throughput(small, head, cpu=True))
    assert "target" not in "\n".join(bench_report.render_throughput(result, head, cpu=False))


def test_conv_tower_benchmark_writes_its_pairs(tmp_path):
    """profiling/bench_conv_tower.py at one repeat: the three pairs, positive times, the command."""
    load_script()  # puts profiling/ on the path
    import bench_conv_tower
    assert bench_conv_tower.main(["--out", str(tmp_path), "--repeats", "1"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    timed = {**results["ops"], **results["tower"]}
    assert len(results["ops"]) == 4 and len(results["tower"]) == 2
    assert all(positive(t["best_ms"]) and len(t["all_ms"]) == 1 for t in timed.values())
    report = (tmp_path / "report.md").read_text()
    assert "command: `python profiling/bench_conv_tower.py --out" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(timed)
    assert bench_conv_tower.main(["--out", str(tmp_path), "--repeats", "0"]) == 2


def test_default_run_writes_outside_the_tracked_tree_and_prints_a_short_summary(capsys):
    """Without --out, bench.py writes under the checkout's runs/ (which git ignores): `git status`
    is the same before and after. What it prints is a short table and the report's path, in plain
    words (no reference to how the engine's own targets were set)."""
    import re
    import shutil
    import subprocess
    root = SCRIPT.parent.parent

    def status():
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip("not a git checkout")
        return out.stdout

    before = status()
    assert load_script().main(["--tiny", "--device", "cpu", "--sections", "methods-memory"]) == 0
    printed = capsys.readouterr().out
    report = Path(re.search(r"the full report \(.*?\): (\S+report\.md);", printed)[1])
    try:
        assert report.is_file() and report.parent.parent == root / "runs"
        assert status() == before
    finally:
        shutil.rmtree(report.parent)
    lines = printed.strip().splitlines()
    assert len(lines) <= 8 and lines[2].split() == ["section", "figure", "engine's", "target"]
    assert lines[3].startswith("memory per method, image") and "sequential" in lines[3]
    assert not re.search(r"\b(acceptance|bar|issue)\b", printed, re.IGNORECASE)


def test_summary_has_one_line_per_section(quick_run):
    """The printed summary of the --tiny run: a header, a blank line, the column names, then one
    line per section, each naming its headline figure."""
    load_script()
    import bench_summary
    _, out = quick_run
    results = json.loads((out / "results.json").read_text())
    lines = bench_summary.summary(results).splitlines()
    assert lines[0].startswith("CPU numbers: ") and lines[1] == ""
    sections = [line.split("  ")[0] for line in lines[3:]]
    assert sections == ["image training step", "language training step", "fused ops",
                        "head memory", "memory per method, image", "memory per method, language"]
    assert "batched reference" in lines[3] and "images/s" in lines[3]
    assert "tokens/s" in lines[4] and "fused / reference peak" in lines[6]


def test_chain_benchmark_times_both_paths_and_writes_its_report(tmp_path):
    load_script()  # puts profiling/ on sys.path
    import bench_chain
    assert bench_chain.main(["--out", str(tmp_path), "--repeats", "1", "--steps", "2"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("noprop-ct", "noprop-fm"):
        r = results["methods"][method]
        assert r["images"] == 360 and r["plain_ms"] > 0 and r["field_on_grid_ms"] > 0
    assert "field_on_grid" in (tmp_path / "report.md").read_text()
    assert bench_chain.main(["--out", str(tmp_path), "--repeats", "0"]) == 2
