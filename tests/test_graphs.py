"""CUDA-graph-captured steps (graphs.py): when capture is used and the one line when it is not; on a
CPU, the "staged" CapturedStep (static buffers, the same function run eagerly) gives bitwise the
uncaptured results, keeps every device counter in place, and every step is free of host syncs
(a guard that raises on .item() and friends, which a planted .item() trips). On a GPU (`-m gpu`),
captured and uncaptured runs of both tasks are compared bitwise."""
import contextlib
import types

import numpy as np
import pytest
import torch

import noprop_fast.loop as loop_module
import noprop_fast.tasks.image as image_module
from noprop_fast import train
from noprop_fast.config import ImageConfig, LMConfig
from noprop_fast.data import load_image_dataset
from noprop_fast.data.shards import TokenData
from noprop_fast.ops import PhiloxNoise
from noprop_fast.graphs import CapturedStep, announce_uncaptured, graph_unavailable_reason, once
from noprop_fast.optim import BlockAdamW
from noprop_fast.runs import load_checkpoint

Tensor = torch.Tensor


# -- the guard -------------------------------------------------------------------------------------

class HostSync(AssertionError):
    pass


# What reads a tensor's value on the host (on CUDA: a sync, and an error inside a capture).
TENSOR_READS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
                "nonzero", "unique", "masked_select"]
TORCH_READS = ["nonzero", "is_nonzero", "equal", "allclose", "unique", "masked_select"]


@contextlib.contextmanager
def no_host_sync():
    """Raises HostSync on any of the reads above made from Python while active. It replaces them
    on torch.Tensor and torch itself (not a TorchFunctionMode: a mode is not active inside the
    autograd engine, so it would miss the autograd Functions' backward). Reads made inside C++
    kernels are not seen; on a GPU the capture itself rejects those."""
    def refuse(name):
        def read(*args, **kwargs):
            raise HostSync(f"host read in the step: {name}")
        return read

    # most Tensor methods live on its C base class: set on Tensor they shadow it, deleted they
    # uncover it again
    saved = [(owner, name, vars(owner).get(name)) for owner, names in
             ((Tensor, TENSOR_READS), (torch, TORCH_READS)) for name in names]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, refuse(name))
        yield
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


# -- builders --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def lm_data():
    vocab = 23
    tokens = np.random.default_rng(0).integers(0, vocab, 600).astype(np.uint16)
    return TokenData(train=[tokens], val=[tokens[:100]], tokenizer="byte", vocab_size=vocab,
                     source="test tokens")


def force_staged(monkeypatch):
    """Make the trainers take the graph path on a CPU (a staged CapturedStep: no capture)."""
    monkeypatch.setattr(loop_module, "graph_unavailable_reason", lambda *args: None)


def image_trainer(digits, tmp_path, name, **config):
    cfg = ImageConfig(**{"num_blocks": 2, "batch_size": 256, "dataset": "digits",
                         "device": "cpu", **config})
    trainer = loop_module.Run(cfg, digits, tmp_path / name, show_progress=False)
    if trainer.ops.fused:
        trainer.noise = PhiloxNoise(7, trainer.device)  # a stream of its own for the direct steps
    return trainer


def lm_trainer(tmp_path, name, **config):
    cfg = LMConfig(**{"num_blocks": 2, "width": 32, "heads": 2, "embed_dim": 8, "seq_len": 8,
                      "batch_size": 2, "eval_tokens": 32, "eval_chains": 1, "device": "cpu",
                      **config})
    return loop_module.Run(cfg, lm_data(), tmp_path / name, show_progress=False)


def assert_same_state(a, b):
    """Model and optimiser state bitwise equal (the lr compared by value)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        assert all(torch.equal(oa["state"][k][n], ob["state"][k][n]) for n in oa["state"][k])
    assert [float(g["lr"]) for g in oa["param_groups"]] == [float(g["lr"]) for g in ob["param_groups"]]


IMAGE_CASES = {"noprop-all": {}, "noprop-sequential": {"block_schedule": "sequential"},
               "backprop": {"method": "backprop"}, "noprop-ct": {"method": "noprop-ct"},
               "noprop-fm": {"method": "noprop-fm"}}


# -- when capture is used --------------------------------------------------------------------------

def test_graph_unavailable_reason_names_each_case():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    ok = ImageConfig(fused=True)
    assert graph_unavailable_reason(cuda, ok) is None
    assert graph_unavailable_reason(cuda, LMConfig(fused=True, precision="bf16")) is None
    assert "cpu" in graph_unavailable_reason(cpu, ok)
    assert "off" in graph_unavailable_reason(cuda, ImageConfig(fused=True, cuda_graphs="off"))
    assert "--fused" in graph_unavailable_reason(cuda, ImageConfig())
    assert "--fused" in graph_unavailable_reason(cuda, ok, fused_loaded=False)
    assert "fp16" in graph_unavailable_reason(cuda, LMConfig(fused=True, precision="fp16"))
    parallel = types.SimpleNamespace(cuda_graphs="auto", fused=True, precision="fp32",
                                     parallel="ddp")
    assert "parallel" in graph_unavailable_reason(cuda, parallel)


def test_the_uncaptured_line_is_said_once_and_only_where_it_tells_something():
    lines = []
    say = once(lines.append)
    say("first")
    say("second")
    assert lines == ["first"]
    cases = [("cpu", "auto", False), ("cpu", "on", True), ("cpu", "off", False),
             ("cuda", "auto", True), ("cuda", "off", False)]
    for device, choice, said in cases:
        lines = []
        cfg = ImageConfig(cuda_graphs=choice)
        announce_uncaptured(torch.device(device), cfg,
                            graph_unavailable_reason(torch.device(device), cfg), lines.append)
        assert len(lines) == int(said), (device, choice, lines)
        assert all(line.startswith("--cuda-graphs: ") and "\n" not in line for line in lines)


def test_cuda_graphs_on_a_cpu_run_says_so_once_and_trains_as_before(tmp_path, capsys):
    args = ["--num-blocks", "2", "--batch-size", "256", "--no-progress", "--epochs", "2"]
    train.run([*args, "--out", str(tmp_path / "off"), "--cuda-graphs", "off"])
    off_err = capsys.readouterr().err
    train.run([*args, "--out", str(tmp_path / "on"), "--cuda-graphs", "on"])
    on_err = capsys.readouterr().err
    assert "--cuda-graphs" not in off_err
    lines = [line for line in on_err.splitlines() if "--cuda-graphs" in line]
    assert len(lines) == 1 and "cpu" in lines[0]  # once for the run, not per step or epoch
    off, on = (load_checkpoint(tmp_path / n) for n in ("off", "on"))
    assert all(torch.equal(off["model"][k], on["model"][k]) for k in off["model"])
    assert [r["train_loss"] for r in off["progress"]["history"]] == \
        [r["train_loss"] for r in on["progress"]["history"]]


# -- CapturedStep, staged on a CPU -----------------------------------------------------------------

def test_staged_step_runs_on_its_static_buffers_and_matches_direct_calls():
    def make():
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 1)
        opt = BlockAdamW([], layer.parameters(), num_blocks=1, lr=0.1, capturable=True)
        return layer, opt

    seen = []

    def step_of(layer, opt):
        def step(x, y):
            seen.append((x.data_ptr(), y.data_ptr()))
            opt.zero_grad(set_to_none=True)
            loss = ((layer(x).squeeze(-1) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    direct_layer, direct_opt = make()
    staged_layer, staged_opt = make()
    direct, staged = step_of(direct_layer, direct_opt), step_of(staged_layer, staged_opt)
    batches = [(torch.randn(4, 3), torch.randn(4)) for _ in range(5)]
    captured = CapturedStep(staged, batches[0], "cpu")
    for x, y in batches:
        assert torch.equal(direct(x, y), captured(x, y))
    staged_calls = seen[1::2]
    buffers = tuple(t.data_ptr() for t in captured.static_inputs)
    assert set(staged_calls) == {buffers}  # every call ran on the same buffers ...
    assert buffers not in [(x.data_ptr(), y.data_ptr()) for x, y in batches]  # ... not the batch's
    assert all(torch.equal(a, b) for a, b in zip(direct_layer.parameters(), staged_layer.parameters()))
    assert captured.calls == 5 and not captured.captured and captured.replays == 0
    assert not captured.fits(torch.randn(3, 3), torch.randn(3))
    with pytest.raises(ValueError, match="another shape"):
        captured(torch.randn(3, 3), torch.randn(3))


@pytest.mark.parametrize("config", [{"fused": True, **c} for c in IMAGE_CASES.values()]
                         + [{"fused": False}], ids=[*IMAGE_CASES, "noprop-all-reference"])
def test_image_epochs_through_the_staged_step_equal_the_uncaptured_ones(digits, tmp_path,
                                                                       monkeypatch, config):
    force_staged(monkeypatch)
    staged, plain = (image_trainer(digits, tmp_path, n, **config) for n in ("staged", "plain"))
    plain.use_graphs = False  # the same capturable optimiser, every step uncaptured
    assert staged.use_graphs and staged.optimizer.capturable and plain.optimizer.capturable
    records = [[t.train_round() for epoch in (1, 2)] for t in (staged, plain)]
    keys = ("train_loss", "block_losses")
    assert [[r.get(k) for k in keys] for r in records[0]] == [[r.get(k) for k in keys] for r in records[1]]
    assert_same_state(staged, plain)
    # 1437 images: 5 batches of 256 through the staged step, the last 157 uncaptured; per pass
    passes = staged.task.passes()
    assert sorted(staged.captured) == sorted((p.start, p.stop) for p in passes)
    assert all(c.calls == 2 * 5 for c in staged.captured.values()) and not plain.captured


@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_lm_steps_through_the_staged_step_equal_the_uncaptured_ones(tmp_path, monkeypatch, method):
    force_staged(monkeypatch)
    staged, plain = (lm_trainer(tmp_path, n, method=method, fused=True) for n in ("staged", "plain"))
    plain.use_graphs = False
    losses = []
    for trainer in (staged, plain):
        torch.manual_seed(5)
        losses.append(torch.stack([trainer.step(*trainer.task.batches.next())[0]
                                   for _ in range(4)]))
    assert torch.equal(losses[0], losses[1])
    assert_same_state(staged, plain)
    assert staged.captured[(None, None)].calls == 4 and not plain.captured


def test_the_state_a_graph_holds_is_updated_in_place(digits, tmp_path, monkeypatch):
    """Everything a step reads or moves on stays at its address (a graph replays addresses), and
    the device state advances: optimiser steps, the Philox offset, BatchNorm's running statistics."""
    force_staged(monkeypatch)
    trainer = image_trainer(digits, tmp_path, "r", fused=True)
    x, y = trainer.data.train_x[:256], trainer.data.train_y[:256]
    trainer.step(x, y, slice(None))  # the first step makes the optimiser's state

    def addresses():
        opt = trainer.optimizer
        tensors = [*trainer.model.parameters(), *trainer.model.buffers(),
                   *(t for s in opt.state.values() for t in s.values()),
                   *(g["lr"] for g in opt.param_groups), trainer.noise.seed, trainer.noise.offset,
                   *trainer.captured[(None, None)].static_inputs]
        return [t.data_ptr() for t in tensors]

    before, draws = addresses(), int(trainer.noise.offset)
    running_means = [b.clone() for n, b in trainer.model.named_buffers() if n.endswith("running_mean")]
    for _ in range(3):
        trainer.step(x, y, slice(None))
    assert addresses() == before
    state = trainer.optimizer.state[trainer.model.classifier.weight]
    assert int(state["step"]) == 4 and int(trainer.noise.offset) == 4 * draws
    means = [b for n, b in trainer.model.named_buffers() if n.endswith("running_mean")]
    assert means and all(not torch.equal(m, m0) for m, m0 in zip(means, running_means))
    noise = trainer.noise
    trainer.train_round()
    trainer.train_round()  # a new epoch reseeds the stream in place
    assert trainer.noise is noise and addresses() == before


# -- host syncs ------------------------------------------------------------------------------------

def image_steps(trainer, blocks):
    x, y = trainer.data.train_x[:16], trainer.data.train_y[:16]
    return lambda: trainer.step(x, y, blocks)


def lm_steps(trainer):
    """trainer.step with its batches fetched beforehand: the fetch (numpy on the host) stays
    outside the graph, and the guard watches what the graph captures."""
    fetched = [trainer.task.batches.next() for _ in range(2)]
    trainer.task.batches.next = lambda: fetched.pop(0)
    return lambda: trainer.step(*trainer.task.batches.next())


STEPS = {
    "image-noprop-all": lambda tmp, d, fused: image_steps(
        image_trainer(d, tmp, "r", batch_size=16, fused=fused), slice(None)),
    "image-noprop-sequential": lambda tmp, d, fused: image_steps(
        image_trainer(d, tmp, "r", batch_size=16, fused=fused, block_schedule="sequential"),
        slice(1, 2)),
    "image-backprop": lambda tmp, d, fused: image_steps(
        image_trainer(d, tmp, "r", batch_size=16, fused=fused, method="backprop"), slice(None)),
    "image-noprop-ct": lambda tmp, d, fused: image_steps(
        image_trainer(d, tmp, "r", batch_size=16, fused=fused, method="noprop-ct",
                      embedding="learned"), slice(None)),
    "image-noprop-fm": lambda tmp, d, fused: image_steps(
        image_trainer(d, tmp, "r", batch_size=16, fused=fused, method="noprop-fm",
                      embedding="learned"), slice(None)),
    "lm-noprop": lambda tmp, d, fused: lm_steps(lm_trainer(tmp, "r", fused=fused)),
    "lm-backprop": lambda tmp, d, fused: lm_steps(lm_trainer(tmp, "r", fused=fused,
                                                             method="backprop")),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("name", STEPS)
def test_steps_are_free_of_host_syncs(digits, tmp_path, monkeypatch, name, fused):
    force_staged(monkeypatch)
    step = STEPS[name](tmp_path, digits, fused)
    with no_host_sync():
        for _ in range(2):  # the first step also makes the optimiser's state
            loss = step()
    loss = loss[0] if isinstance(loss, tuple) else loss
    assert torch.isfinite(loss).item()


class _ReadInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        scale = grad.abs().max().item()  # the planted host read
        return grad * 2 / max(scale, 1.0) * scale


PLANTED = {
    "item": lambda x: x.sum() * x.mean().item(),
    "tolist": lambda x: x.sum() * len(x.tolist()),
    "branch": lambda x: x.sum() if x.sum() > 0 else -x.sum(),
    "in backward": lambda x: _ReadInBackward.apply(x).sum(),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_the_guard_catches_a_planted_host_read(planted):
    x = torch.randn(5, requires_grad=True)
    with pytest.raises((HostSync, RuntimeError), match="host read"):
        with no_host_sync():
            PLANTED[planted](x).backward()


def test_the_guard_catches_a_host_read_planted_in_a_training_step(digits, tmp_path, monkeypatch):
    force_staged(monkeypatch)
    real = image_module.noprop_loss

    def planted(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * (1 + 0 * loss.item()), parts

    step = STEPS["image-noprop-all"](tmp_path, digits, True)
    with no_host_sync():
        step()  # the unpatched step passes
    monkeypatch.setattr(image_module, "noprop_loss", planted)
    with pytest.raises(HostSync, match="item"):
        with no_host_sync():
            step()


# -- on a GPU: captured and uncaptured runs, bitwise ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", [*IMAGE_CASES, "lm-noprop", "lm-backprop"])
def test_captured_and_uncaptured_runs_agree_bitwise(digits, tmp_path, case, precision):
    """Same seed, same steps: the graph's results equal the uncaptured step's bit for bit (both
    with the capturable optimiser). One-hot embeddings: the fused noise op's gradient for a learned
    W_embed accumulates with atomics, whose order differs from run to run even uncaptured."""
    common = {"device": "cuda", "fused": True, "precision": precision, "cuda_graphs": "on"}
    if case in IMAGE_CASES:
        # 1437 images / 64: 22 batches per pass through the graph, then a partial one uncaptured
        make = lambda n: loop_module.Run(  # noqa: E731
            ImageConfig(num_blocks=3, batch_size=64, **IMAGE_CASES[case], **common), digits,
            tmp_path / n, show_progress=False)
    else:
        method = case.split("-")[1]
        make = lambda n: lm_trainer(tmp_path, n, method=method, embed_init="onehot"  # noqa: E731
                                    if method == "noprop" else "learned", **common)
    captured, plain = make("captured"), make("plain")
    plain.use_graphs = False
    assert captured.use_graphs and captured.optimizer.capturable and plain.optimizer.capturable
    results = []
    for trainer in (captured, plain):
        if case in IMAGE_CASES:
            records = [trainer.train_round() for e in (1, 2)]
            results.append([(r["train_loss"], r.get("block_losses")) for r in records])
        else:
            torch.manual_seed(3)
            results.append(torch.stack([trainer.step(*trainer.task.batches.next())[0]
                                        for _ in range(8)]).tolist())
    assert results[0] == results[1]
    assert_same_state(captured, plain)
    steps = list(captured.captured.values())
    assert steps and all(s.captured and s.failed is None and s.replays > 0 for s in steps)


@pytest.mark.parametrize("method, solver", [("noprop-ct", "euler"), ("noprop-fm", "euler"),
                                            ("noprop-fm", "heun")])
def test_ct_and_fm_inference_through_the_staged_step_equals_the_eager_one(digits, tmp_path, method,
                                                                          solver, monkeypatch):
    """The chain and the ODE through a CapturedStep (staged on a CPU) give the eager predictions,
    and their step reads nothing on the host (so a GPU can capture it)."""
    from noprop_fast import continuous
    from noprop_fast.graphs import CapturedStep
    trainer = image_trainer(digits, tmp_path, "r", method=method)
    calls = []

    class Guarded(CapturedStep):
        def __call__(self, *inputs):
            calls.append(1)
            with no_host_sync():
                return super().__call__(*inputs)
    monkeypatch.setattr(continuous, "CapturedStep", Guarded)
    x = trainer.data.test_x[:50]
    eager, staged = (continuous.predict_classes(trainer.model, x, 7, solver=solver, seed=2,
                                                graphs=graphs) for graphs in (False, True))
    assert torch.equal(eager, staged) and len(calls) == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, extra", [("noprop-ct", {"inference": "noise-free"}),
                                           ("noprop-fm", {"ode_solver": "euler"}),
                                           ("noprop-fm", {"ode_solver": "heun"})])
def test_captured_inference_equals_the_eager_one(digits, tmp_path, method, extra, monkeypatch):
    """On a GPU the chain's (ODE's) one step is captured and replayed: the same predictions as
    the eager loop (z_0 is drawn outside the graph; CT without Eq. 3's noise)."""
    from noprop_fast import continuous
    from noprop_fast.graphs import CapturedStep
    made = []
    monkeypatch.setattr(continuous, "CapturedStep",
                        lambda *a, **k: made.append(CapturedStep(*a, **k)) or made[-1])
    trainer = loop_module.Run(ImageConfig(method=method, batch_size=64, device="cuda", fused=True,
                                          **extra), digits, tmp_path / "r", show_progress=False)
    x, steps = trainer.data.test_x, 40
    stochastic = trainer.cfg.inference == "stochastic"
    eager, captured = (continuous.predict_classes(trainer.model, x, steps, stochastic,
                                                  trainer.cfg.ode_solver, seed=4, graphs=graphs)
                       for graphs in (False, True))
    assert torch.equal(eager, captured)
    assert made and made[0].captured and made[0].failed is None and made[0].replays == steps - 1
