"""Train the reference path and a fused path side by side and return their losses step by step.

Both start from the same weights, see the same minibatches and the same dropout masks (the global
generator is reseeded before each step), and draw the same Philox noise: the fused ops draw it
inside the op, the reference path through `PhiloxNoise.normals` in plain PyTorch. Any difference in
the losses is then the ops' arithmetic, which is what the tolerances bound.
"""
import copy

import torch

from noprop_fast.config import ImageConfig
from noprop_fast.data import load_image_dataset
from noprop_fast.ops import PRECISIONS, REFERENCE, PhiloxNoise, fused_ops
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.image import build_model, train_step

# Relative tolerances. FIRST_STEP: the first step's losses and every parameter's gradient, from
# identical weights: only the ops' rounding differs (fp32: 2e-7 seen on the losses). STEP: the
# losses of every later step of the two independent runs; AdamW's update m / sqrt(v) turns rounding
# differences in near-zero gradients into lr-sized steps, so the runs drift apart (fp32: up to 6e-4
# after four steps with prototype embeddings, 2e-6 with one-hot). The gradients are held tightly on
# the first step; the later steps catch what only shows over steps (noise drawn at the wrong offset
# moves the losses by ~1e-1).
FIRST_STEP_RTOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
STEP_RTOL = {"fp32": 2e-3, "bf16": 2e-2, "fp16": 1e-2}


def losses_side_by_side(backend: str, steps: int = 4, precision: str = "fp32", device: str = "cpu",
                        **config):
    """[(reference loss, fused loss, reference block losses, fused block losses)] per step, and
    {parameter name: (reference gradient, fused gradient)} of the first step."""
    cfg = ImageConfig(**{"num_blocks": 3, "batch_size": 16, "dataset": "digits", **config})
    device = torch.device(device)
    data = load_image_dataset("digits").to(device)
    dtype = PRECISIONS[precision]
    reference = build_model(cfg, data, device).configure(REFERENCE, dtype)
    fused = copy.deepcopy(reference).configure(fused_ops(device, backend), dtype)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)
    paths = [(reference, make_optimizer(reference, cfg), PhiloxNoise(11, device)),
             (fused, make_optimizer(fused, cfg), PhiloxNoise(11, device))]
    blocks = slice(1, 2) if cfg.block_schedule == "sequential" else slice(None)
    rows = []
    for step in range(steps):
        x = data.train_x[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        y = data.train_y[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        row = []
        for model, optimizer, noise in paths:
            torch.manual_seed(step)  # the same dropout masks on both paths
            loss, parts = train_step(model, optimizer, schedule, x, y, blocks, noise)
            row.append((loss.item(), parts.get("block_losses")))
        rows.append((row[0][0], row[1][0], row[0][1], row[1][1]))
        if step == 0:  # the gradients stay in .grad until the next step's zero_grad
            grads = {name: (p.grad.clone(), fused.get_parameter(name).grad.clone())
                     for name, p in reference.named_parameters() if p.grad is not None}
    return rows, grads


def assert_same_losses(result, precision: str = "fp32"):
    rows, grads = result
    assert grads, "no parameter received a gradient"
    # gradients: absolute error against the largest gradient anywhere in the model, since rounding
    # noise follows the size of the summands, not of the sum (an FC bias before BatchNorm has an
    # exact gradient of zero and a computed one of ~1e-8 on both paths)
    scale = max(ref.abs().max().item() for ref, _ in grads.values())
    rtol = FIRST_STEP_RTOL[precision]
    for name, (ref, fused) in grads.items():
        torch.testing.assert_close(fused, ref, rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"first-step gradient of {name}: {m}")
    for step, (ref, fused, ref_blocks, fused_blocks) in enumerate(rows):
        rtol = (FIRST_STEP_RTOL if step == 0 else STEP_RTOL)[precision]
        assert abs(fused - ref) <= rtol * abs(ref), f"step {step}: loss {fused} vs reference {ref}"
        if ref_blocks is not None:
            torch.testing.assert_close(fused_blocks, ref_blocks, rtol=rtol, atol=rtol * 1e-2,
                                       msg=lambda m: f"step {step} block losses: {m}")
    # the runs moved: equal losses that never change would make the comparison empty
    assert len({round(ref, 6) for ref, *_ in rows}) == len(rows)


def assert_same_lm_step(ref, fused, schedule, x, y, seed: int = 11) -> None:
    """One language-model loss and backward on each model (same weights, the same Philox noise):
    the losses agree to 1e-5 and every parameter's gradient to 1e-4, with an absolute floor of
    1e-5 of the largest gradient (fp32)."""
    from noprop_fast.tasks.language import lm_loss
    losses, grads = [], []
    for model in (ref, fused):
        loss, _ = lm_loss(model, schedule, x, y, noise=PhiloxNoise(seed, x.device))
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    scale = max(g.abs().max().item() for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
