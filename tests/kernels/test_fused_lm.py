"""The language models on the Triton fused path (attention, FC, head, noise, block loss, and the
chunked cross-entropy) against the reference path: the loss and every parameter's gradient of one
step on identical noise. CPU tensors under TRITON_INTERPRET=1 (fp32), CUDA tensors on a GPU."""
import pytest
import torch

from noprop_fast.fused import PhiloxNoise, fused_ops
from noprop_fast.language import lm_loss
from noprop_fast.models.lm import GPT, LanguageModel
from noprop_fast.schedule import NoiseSchedule

V, L, T = 37, 19, 2


def build(method, fused, device):
    torch.manual_seed(0)
    model = (LanguageModel(T, V, L, 32, 2, 1, 8) if method == "noprop" else GPT(T, V, L, 32, 2))
    return model.to(device).configure(fused)


@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_triton_lm_step_matches_the_reference(method, device):
    ops = fused_ops(torch.device(device), backend="triton")
    ref, fused = build(method, None, device), build(method, ops, device)
    schedule = NoiseSchedule.cosine(T, device=device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, L), generator=g).to(device)
    y = torch.randint(0, V, (3, L), generator=g).to(device)
    losses, grads = [], []
    for model in (ref, fused):
        loss, _ = lm_loss(model, schedule, x, y, PhiloxNoise(5, torch.device(device)))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
