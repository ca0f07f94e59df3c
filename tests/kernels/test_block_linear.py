"""block_linear (batched multi-block linear + bias, forward and backward) against its
plain-PyTorch reference: the output and every gradient, over odd shapes, with and without bias."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import DTYPES, assert_close

from noprop_fast.kernels import block_linear as module
from noprop_fast.kernels.block_linear import block_linear, block_linear_ref
from noprop_fast.layers import BlockLinear


def _inputs(blocks, n, k, m_out, has_bias, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    x, weight, dy = draw(blocks, n, k), draw(blocks, m_out, k), draw(blocks, n, m_out)
    bias = draw(blocks, m_out) if has_bias else None
    return x, weight, bias, dy


def _check_against_reference(x, weight, bias, dy, dtype):
    """Kernel vs reference (fp32 copies of the same values): Y, dX, dW and dbias."""
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    y = block_linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    y.backward(dy)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = block_linear_ref(ref_leaves[0], ref_leaves[1],
                             ref_leaves[2] if bias is not None else None)
    y_ref.backward(dy.float())

    _, n, k = x.shape
    m_out = weight.shape[1]
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, scale=math.sqrt(k))                      # sums over K
    assert_close(leaves[0].grad, ref_leaves[0].grad, dtype, scale=math.sqrt(m_out))  # over M_out
    assert_close(leaves[1].grad, ref_leaves[1].grad, dtype, scale=math.sqrt(n))      # over N
    if bias is not None:
        assert_close(leaves[2].grad, ref_leaves[2].grad, dtype, scale=math.sqrt(n))
    for leaf in leaves:
        assert leaf.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.sampled_from([1, 2, 3]), n=st.sampled_from([1, 2, 7, 17]),
       k=st.sampled_from([1, 3, 16, 33]), m_out=st.sampled_from([1, 5, 16, 31]),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_gradients_match_reference(device, dtype, blocks, n, k, m_out, has_bias, seed):
    x, weight, bias, dy = _inputs(blocks, n, k, m_out, has_bias, dtype, device, seed)
    _check_against_reference(x, weight, bias, dy, dtype)


def test_ten_blocks_larger_than_a_tile_in_every_dimension(device):
    # The interpreter's tile is 64 x 32 x 16 (fp32): N = 70, K = 40 and M_out = 67 cross a tile
    # edge, with a partial tile, in every role of every product (dW's rows are M_out).
    x, weight, bias, dy = _inputs(10, 70, 40, 67, True, torch.float32, device, seed=0)
    _check_against_reference(x, weight, bias, dy, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_autotune_config(device, dtype, monkeypatch):
    """Each configuration alone (the autotuner runs its only config without timing): sizes above the
    largest tile, so every config sees several tiles and partial ones."""
    configs = module._FP32_CONFIGS if dtype == torch.float32 else module._HALF_CONFIGS
    x, weight, bias, dy = _inputs(2, 131, 137, 133, True, dtype, device, seed=1)
    for config in configs:
        monkeypatch.setattr(module._batched_matmul_kernel, "configs", [config])
        _check_against_reference(x, weight, bias, dy, dtype)


def test_matches_block_linear_layer_on_strided_inputs(device):
    """Same numbers as layers.BlockLinear, on a strided slice of the blocks and a transposed x, with
    the gradient of a sum (dY expanded from a scalar: stride 0 everywhere)."""
    torch.manual_seed(0)
    layer = BlockLinear(num_blocks=6, in_features=13, out_features=9).to(device)
    blocks = slice(1, None, 2)                                      # blocks 1, 3, 5: strided weight
    x = torch.randn(7, 3, 13, device=device).transpose(0, 1)        # [3, 7, 13], not contiguous
    layer(x, blocks).sum().backward()
    expected = [layer(x, blocks).detach(), layer.weight.grad.clone(), layer.bias.grad.clone()]
    layer.zero_grad()

    y = block_linear(x, layer.weight[blocks], layer.bias[blocks])
    y.sum().backward()
    for actual, reference in zip([y, layer.weight.grad, layer.bias.grad], expected):
        assert_close(actual, reference, torch.float32, scale=4)
    assert layer.weight.grad[0::2].abs().sum() == 0                 # untouched blocks


_BAD_INPUTS = {
    "x not 3-d": lambda d: (torch.randn(4, 5, device=d), torch.randn(1, 3, 5, device=d), None),
    "block count": lambda d: (torch.randn(2, 4, 5, device=d), torch.randn(3, 3, 5, device=d), None),
    "in features": lambda d: (torch.randn(2, 4, 5, device=d), torch.randn(2, 3, 6, device=d), None),
    "bias shape": lambda d: (torch.randn(2, 4, 5, device=d), torch.randn(2, 3, 5, device=d),
                             torch.randn(2, 4, device=d)),
    "mixed dtypes": lambda d: (torch.randn(2, 4, 5, device=d),
                               torch.randn(2, 3, 5, device=d, dtype=torch.float16), None),
    "integer dtype": lambda d: (torch.ones(2, 4, 5, device=d, dtype=torch.int32),
                                torch.ones(2, 3, 5, device=d, dtype=torch.int32), None),
    "empty": lambda d: (torch.randn(2, 0, 5, device=d), torch.randn(2, 3, 5, device=d), None),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_input_raises_value_error(device, case):
    with pytest.raises(ValueError, match="block_linear"):
        block_linear(*_BAD_INPUTS[case](device))
