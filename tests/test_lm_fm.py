"""NoProp-FM on tokens (`--task lm --method noprop-fm`): the loss trains down, no leak from later
tokens (context features, vector field, the ODE's logits), the ODE's precomputed field matches the
network's, the chain losses' generator, an exact resume, and the config's refusals."""
import json

import pytest
import torch

from noprop_fast.config import LMConfig
from noprop_fast.continuous import fm_ode
from noprop_fast.errors import ConfigError
from noprop_fast.models.lm import FlowLanguageModel
from noprop_fast.tasks.language import fm_chain_losses, lm_loss, sample, validation_loss
from noprop_fast.train import main
from test_lm import L, T, V, changed_after, one_thread, windows  # noqa: F401



def flow_model(seed=0):
    torch.manual_seed(seed)
    return FlowLanguageModel(T, V, L, 32, 2, 1, 8)


def test_one_network_of_all_the_layers():
    model = flow_model()
    assert model.method == "noprop-fm" and model.num_blocks == 1
    assert len(model.blocks.layers) == T  # num_blocks x layers_per_block causal layers
    assert model.blocks.head.weight.shape == (1, 8, 32)  # a linear head to d
    assert not hasattr(model.blocks, "query")


def test_loss_trains_down_on_a_tiny_corpus():
    model = flow_model()
    x, y = windows(4), windows(4, seed=3)  # one fixed batch: the loss must fall on it
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 2)  # two draws of t and z_0, alternated
        loss, parts = lm_loss(model, None, x, y)
        assert set(parts) == {"flow", "ce", "align"}  # learned W_embed: the anchor is on
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses


@pytest.mark.parametrize("i", [0, 4, L - 2])
def test_flow_lm_has_no_leak(i):
    model = flow_model().eval()
    x = windows()
    x2 = changed_after(x, i)
    rows = lambda t: t.view(t.shape[0], 3, L, -1)[:, :, :i + 1]  # noqa: E731  [1, N, i+1, .]
    f, f2 = model.blocks.features(x), model.blocks.features(x2)
    assert torch.equal(rows(f), rows(f2))
    z, t = torch.randn(1, 3 * L, 8), torch.rand(3 * L)
    w = model.embedding.weight
    assert torch.equal(rows(model.blocks.denoise(f, z, w, t=t)),
                       rows(model.blocks.denoise(f2, z, w, t=t)))
    # the ODE's logits, from the same z_0
    a, b = (model.classifier(fm_ode(model, feats, 4, "heun",
                                    generator=torch.Generator().manual_seed(5))).view(3, L, V)
            for feats in (f, f2))
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    assert not torch.equal(a[:, i + 1:], b[:, i + 1:])  # later positions do see the change
    # and the chain losses of the rows up to i (their targets unchanged)
    y = windows(seed=4).reshape(-1)
    la, lb = (fm_chain_losses(model, feats, y, 3, "euler", torch.Generator().manual_seed(2))
              .view(3, L) for feats in (f, f2))
    assert torch.equal(la[:, :i + 1], lb[:, :i + 1])


def test_ode_field_matches_the_network():
    model = flow_model()
    with torch.no_grad():  # a trained-looking head: not the near-zero init
        model.blocks.head.weight.normal_()
    features = model.blocks.features(windows())
    times = torch.linspace(0, 1, 5)
    field = model.blocks.field_on_grid(features, model.embedding.weight, times)
    z = torch.randn(3 * L, 8)
    for k in range(5):
        direct = model.blocks.denoise(features, z[None], model.embedding.weight,
                                      t=times[k].expand(3 * L))[0]
        torch.testing.assert_close(field(z, torch.tensor(k)), direct, rtol=1e-5, atol=1e-5)


def test_chain_losses_draw_from_their_generator_alone():
    model = flow_model().eval()
    features, y = model.blocks.features(windows()), windows(seed=4).reshape(-1)
    torch.manual_seed(0)
    a = fm_chain_losses(model, features, y, 4, "euler", torch.Generator().manual_seed(1))
    torch.manual_seed(99)  # the global generator does not matter
    b = fm_chain_losses(model, features, y, 4, "euler", torch.Generator().manual_seed(1))
    c = fm_chain_losses(model, features, y, 4, "euler", torch.Generator().manual_seed(2))
    assert a.shape == (3 * L,) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a > 0).all()
    val = validation_loss(model, None, [(windows(), windows(seed=4))], chains=3, ode_steps=4)
    assert val["val_loss"] <= val["val_loss_one_chain"] + 0.5  # a mixture of 3 vs one chain
    assert len(sample(model, None, [1, 2], 4, generator=torch.Generator().manual_seed(0),
                      ode_steps=3)) == 4


TINY = ["--task", "lm", "--method", "noprop-fm", "--width", "32", "--heads", "2",
        "--embed-dim", "8", "--num-blocks", "2", "--seq-len", "16", "--batch-size", "4",
        "--eval-tokens", "64", "--eval-chains", "2", "--inference-steps", "3",
        "--sample-tokens", "0", "--no-progress", "--device", "cpu"]


def test_flow_lm_resume_replays_the_uninterrupted_run(word_shards, tmp_path, capsys):
    base = TINY + ["--data-dir", str(word_shards), "--eval-every", "2"]
    assert main(base + ["--max-steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main(base + ["--max-steps", "2", "--out", str(tmp_path / "part")]) == 0
    code = main(["--task", "lm", "--resume", str(tmp_path / "part"), "--max-steps", "4",
                 "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "resuming" in out.out and "one network of 2 layers" in out.out
    whole, part = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False)
                   for r in ("whole", "part"))
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, part["model"][name]), name
    assert whole["progress"]["history"][-1]["val_loss"] == \
        part["progress"]["history"][-1]["val_loss"]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["method"] == "noprop-fm" and summary["inference_steps"] == 3
    assert summary["val_loss"] <= summary["val_loss_one_chain"] + 1.0


@pytest.mark.parametrize("changes, message", [
    ({"parallel": "blocks"}, "parallel: noprop-fm runs in one process"),
    ({"parallel": "blocks+data"}, "parallel: noprop-fm runs in one process"),
    ({"embed_init": "mlm"}, "embed_init: noprop-fm"),
    ({"ode_solver": "rk4"}, "ode_solver"),
])
def test_config_refusals(changes, message):
    assert LMConfig(method="noprop-fm").validate().inference_steps == 20
    # the blocks' options of the stdlib config are NoProp-LM's: noprop-fm goes on without them
    LMConfig(method="noprop-fm", block_ce=1.0, readout="fitted", calibrate_tokens=64).validate()
    with pytest.raises(ConfigError, match=message) as err:
        LMConfig(method="noprop-fm", **changes).validate()
    assert "\n" not in str(err.value)


def test_cli_refusal_is_one_line(capsys):
    assert main(["--task", "lm", "--method", "noprop-fm", "--parallel", "blocks"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "noprop-fm runs in one process" in err
