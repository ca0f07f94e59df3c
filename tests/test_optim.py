"""BlockAdamW: exactly AdamW when every block trains; idle blocks untouched when some do not."""
import copy

import pytest
import torch

from noprop_fast.optim import BlockAdamW

T = 4


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    block = [torch.nn.Parameter(torch.randn(T, 5, 3, generator=g, dtype=torch.float64)),
             torch.nn.Parameter(torch.randn(T, 7, generator=g, dtype=torch.float64))]
    shared = [torch.nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.float64))]
    return block, shared


def fake_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_all_blocks_equals_torch_adamw():
    block, shared = make_params()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in block + shared]
    ours = BlockAdamW(block, shared, T, lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(7):
        fake_grads(block + shared, step)
        fake_grads(ref, step)
        ours.step()
        theirs.step()
    for a, b in zip(block + shared, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sequential_blocks_leave_idle_blocks_untouched_and_count_steps_per_block():
    block, shared = make_params()
    opt = BlockAdamW(block, shared, T, lr=1e-2, weight_decay=0.1)
    # block 1 trains 3 steps; every block's slice receives a gradient (zero for idle blocks, as
    # autograd gives a stacked parameter), yet only block 1 moves
    before = [p.detach().clone() for p in block]
    for step in range(3):
        fake_grads(block + shared, step)
        for p in block:
            keep = p.grad[1].clone()
            p.grad.zero_()
            p.grad[1] = keep
        opt.step(slice(1, 2))
    for p, b in zip(block, before):
        assert torch.equal(p[0], b[0]) and torch.equal(p[2:], b[2:])
        assert not torch.equal(p[1], b[1])
    assert opt.state[block[0]]["step"].tolist() == [0, 3, 0, 0]
    assert opt.state[shared[0]]["step"].item() == 3


def test_one_block_at_a_time_equals_an_independent_adamw_per_block():
    """Block 2 trained after block 1 sees a fresh AdamW (its own step count and moments)."""
    block, shared = make_params()
    solo = torch.nn.Parameter(block[0][2].detach().clone())
    ours = BlockAdamW(block, shared, T, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([solo], lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):  # block 1 first: block 2 must not move, nor count steps
        fake_grads(block + shared, step)
        ours.step(slice(1, 2))
    for step in range(4):
        fake_grads(block + shared, 10 + step)
        solo.grad = block[0].grad[2].clone()
        ours.step(slice(2, 3))
        ref.step()
    torch.testing.assert_close(block[0][2], solo, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip():
    block, shared = make_params()
    opt = BlockAdamW(block, shared, T)
    fake_grads(block + shared, 0)
    opt.step(slice(0, 2))
    block2 = [torch.nn.Parameter(p.detach().clone()) for p in block]
    shared2 = [torch.nn.Parameter(p.detach().clone()) for p in shared]
    opt2 = BlockAdamW(block2, shared2, T)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for step in range(3):
        fake_grads(block + shared, step + 1)
        fake_grads(block2 + shared2, step + 1)
        opt.step(slice(1, 4))
        opt2.step(slice(1, 4))
    for a, b in zip(block + shared, block2 + shared2):
        assert torch.equal(a, b)


def test_block_parameter_without_block_dimension_is_refused():
    with pytest.raises(ValueError, match="leading block dimension"):
        BlockAdamW([torch.nn.Parameter(torch.zeros(3, 2))], [], num_blocks=4)


# -- capturable: the learning rate on the device, for a step captured in a CUDA graph ------------

@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_capturable_agrees_with_the_plain_update(dtype, rtol):
    """Same update up to rounding (it divides by lr where the plain one multiplies), over all-block
    and one-block steps."""
    block, shared = make_params()
    block, shared = ([torch.nn.Parameter(p.detach().to(dtype)) for p in ps] for ps in (block, shared))
    block2 = [torch.nn.Parameter(p.detach().clone()) for p in block]
    shared2 = [torch.nn.Parameter(p.detach().clone()) for p in shared]
    start_values = [p.detach().clone() for p in block + shared]
    plain = BlockAdamW(block, shared, T, lr=1e-2, weight_decay=0.1)
    capturable = BlockAdamW(block2, shared2, T, lr=1e-2, weight_decay=0.1, capturable=True)
    for step, blocks in enumerate([slice(None)] * 3 + [slice(1, 2)] * 3):
        fake_grads(block + shared, step)
        fake_grads(block2 + shared2, step)
        plain.step(blocks)
        capturable.step(blocks)
    for a, b in zip(block + shared, block2 + shared2):
        torch.testing.assert_close(b, a, rtol=rtol, atol=0)
    for a, start in zip(block + shared, start_values):
        assert (a - start).abs().max() > 1e-3  # they did train: the comparison is not vacuous
    assert capturable.state[block2[0]]["step"].tolist() == [3, 6, 3, 3]


def test_capturable_lr_is_a_device_tensor_changed_in_place():
    block, shared = make_params()
    opt = BlockAdamW(block, shared, T, lr=1e-2, capturable=True)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) and lr.dim() == 0 and lr.device == block[0].device
               for lr in lrs)
    opt.set_lr(0.5)
    assert [g["lr"] for g in opt.param_groups] == lrs  # the very same tensors ...
    assert all(lr.item() == 0.5 for lr in lrs)          # ... holding the new value
    plain = BlockAdamW(*make_params(), T, lr=1e-2)
    plain.set_lr(0.5)
    assert all(g["lr"] == 0.5 for g in plain.param_groups)
    # the update follows the new lr: one step from the same start moves the same distance
    p_plain = [p for g in plain.param_groups for p in g["params"]]
    p_capt = [p for g in opt.param_groups for p in g["params"]]
    fake_grads(p_plain, 0)
    fake_grads(p_capt, 0)
    plain.step()
    opt.step()
    for a, b in zip(p_plain, p_capt):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)


@pytest.mark.parametrize("source_capturable", [False, True])
def test_checkpoint_loads_across_capturable_and_plain(source_capturable):
    """A plain checkpoint into a capturable optimiser (lr becomes a tensor) and back (a float)."""
    block, shared = make_params()
    opt = BlockAdamW(block, shared, T, lr=1e-2, capturable=source_capturable)
    fake_grads(block + shared, 0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    block2 = [torch.nn.Parameter(p.detach().clone()) for p in block]
    shared2 = [torch.nn.Parameter(p.detach().clone()) for p in shared]
    opt2 = BlockAdamW(block2, shared2, T, lr=1.0, capturable=not source_capturable)
    opt2.load_state_dict(state)
    for g in opt2.param_groups:
        assert isinstance(g["lr"], torch.Tensor) is (not source_capturable)
        assert float(g["lr"]) == 1e-2  # the checkpoint's lr, not the constructor's
    for step in range(3):
        fake_grads(block + shared, step + 1)
        fake_grads(block2 + shared2, step + 1)
        opt.step()
        opt2.step()
    for a, b in zip(block + shared, block2 + shared2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    assert opt2.state[block2[0]]["step"].tolist() == [4] * T
