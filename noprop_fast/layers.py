"""Batched multi-block layers: T blocks' parameters stacked along a leading block dimension.

NoProp's T blocks have the same architecture and never exchange activations while training, so
every layer here holds all T blocks' parameters in one tensor whose first dimension is the block,
and runs them as one computation:

    BlockLinear      weight [T, out, in]        Y[t] = X[t] W[t]^T + b[t]  (`ops.block_linear`)
    BlockConv2d      weight [T, out, in, k, k]  a conv with T x out channels; groups = T when each
                                                block reads its own input, groups = 1 when all
                                                blocks read the same image (the first conv)
    BlockBatchNorm   weight [T, C]              statistics per (block, channel)
    BlockLayerNorm   weight [T, C]              LayerNorm over C with each block's affine
    BlockEmbedding   weight [T, V, C]           a lookup table per block (token, position)

Every forward takes `blocks`, a slice of the block range (default: all), and uses only those
blocks' parameters. Activations are [B, N, C] (B = blocks in the slice); conv maps [N, B * C, H, W],
block-major. Weights stay fp32, cast to the input's dtype in every forward (`--precision`;
BatchNorm keeps fp32 statistics). No computation here mixes blocks (a test checks).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import REFERENCE, Ops

ALL_BLOCKS = slice(None)


def block_slice(tensor: torch.Tensor, blocks: slice) -> torch.Tensor:
    """tensor[blocks]; all blocks give the tensor itself, not a view: a view's backward would fill
    a zeroed copy of the whole parameter and copy the gradient into it, once per layer and step."""
    return tensor if blocks == ALL_BLOCKS else tensor[blocks]


class BlockLinear(nn.Module):
    """T independent linear layers, run as one batched matmul. Input [B, N, in] -> [B, N, out]."""

    def __init__(self, num_blocks: int, in_features: int, out_features: int):
        super().__init__()
        self.num_blocks, self.in_features, self.out_features = num_blocks, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_blocks, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_blocks, out_features))
        # nn.Linear's default initialisation, drawn for each block: U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)
        self.ops = REFERENCE  # whose block_linear computes the layer (`use_ops`)

    def forward(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        return self.forward_with(x, block_slice(self.weight, blocks), block_slice(self.bias, blocks))

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The layer on some blocks' weights [B, out, in] and biases [B, out] (see ConvTower)."""
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        if x.shape[0] != weight.shape[0] or x.shape[-1] != self.in_features:
            raise ValueError(f"BlockLinear expects [{weight.shape[0]}, N, {self.in_features}], "
                             f"got {list(x.shape)}")
        return self.ops.block_linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"blocks={self.num_blocks}, in={self.in_features}, out={self.out_features}"


class BlockConv2d(nn.Module):
    """T independent 3x3 ('same' padding) convs as one conv of T x out channels.

    shared_input: every block reads the same input [N, in, H, W] (the image), so the blocks' filters
    are simply stacked as output channels. Otherwise input is [N, B * in, H, W] and the conv is
    grouped by block. Output [N, B * out, H, W].
    """

    def __init__(self, num_blocks: int, in_channels: int, out_channels: int, shared_input: bool,
                 kernel_size: int = 3):
        super().__init__()
        self.num_blocks, self.shared_input = num_blocks, shared_input
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(
            torch.empty(num_blocks, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_blocks, out_channels))
        # nn.Conv2d's default initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        return self.forward_with(x, block_slice(self.weight, blocks), block_slice(self.bias, blocks))

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The convs of some blocks' weights [B, out, in, k, k] and biases [B, out]."""
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        nb = weight.shape[0]
        expected = self.in_channels if self.shared_input else nb * self.in_channels
        if x.shape[1] != expected:
            raise ValueError(f"BlockConv2d expects {expected} input channels, got {list(x.shape)}")
        weight = weight.reshape(nb * self.out_channels, self.in_channels, self.kernel_size,
                                self.kernel_size)
        groups = 1 if self.shared_input else nb
        return F.conv2d(x, weight, bias.reshape(-1), padding=self.kernel_size // 2, groups=groups)

    def extra_repr(self) -> str:
        return (f"blocks={self.num_blocks}, in={self.in_channels}, out={self.out_channels}, "
                f"shared_input={self.shared_input}")


class BlockBatchNorm(nn.Module):
    """BatchNorm1d with statistics and affine parameters per (block, channel). Input [B, N, C].

    Equivalent to T separate nn.BatchNorm1d(C): each (block, channel) is normalised over the batch
    alone. Running statistics of the blocks in the slice are updated in place.
    """

    def __init__(self, num_blocks: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_blocks, self.num_features, self.eps, self.momentum = (
            num_blocks, num_features, eps, momentum)
        self.weight = nn.Parameter(torch.ones(num_blocks, num_features))
        self.bias = nn.Parameter(torch.zeros(num_blocks, num_features))
        self.register_buffer("running_mean", torch.zeros(num_blocks, num_features))
        self.register_buffer("running_var", torch.ones(num_blocks, num_features))

    def forward(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        if blocks.step not in (None, 1):
            # a strided slice of the buffers is a copy: the running statistics would not update
            raise ValueError(f"BlockBatchNorm takes a contiguous block slice, got {blocks}")
        nb, n, c = x.shape
        # Rows of a [T, C] buffer are contiguous, so these reshapes are views and batch_norm's
        # in-place running-statistics update lands in the buffers.
        running_mean = self.running_mean[blocks].reshape(-1)
        running_var = self.running_var[blocks].reshape(-1)
        if running_mean.numel() != nb * c:
            raise ValueError(f"BlockBatchNorm expects [{running_mean.numel() // c}, N, {c}], "
                             f"got {list(x.shape)}")
        flat = x.transpose(0, 1).reshape(n, nb * c)  # [N, B * C]: channel (b, c) at b * C + c
        weight = block_slice(self.weight, blocks).reshape(-1)
        bias = block_slice(self.bias, blocks).reshape(-1)
        out = F.batch_norm(flat, running_mean, running_var, weight, bias, self.training,
                           self.momentum, self.eps)
        return out.view(n, nb, c).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"blocks={self.num_blocks}, features={self.num_features}"


class BlockLayerNorm(nn.Module):
    """LayerNorm over the last dimension with an affine (weight, bias) per block. Input [B, ..., C]."""

    def __init__(self, num_blocks: int, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_blocks, self.num_features, self.eps = num_blocks, num_features, eps
        self.weight = nn.Parameter(torch.ones(num_blocks, num_features))
        self.bias = nn.Parameter(torch.zeros(num_blocks, num_features))

    def forward(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        weight = block_slice(self.weight, blocks).to(x.dtype)
        bias = block_slice(self.bias, blocks).to(x.dtype)
        if x.shape[0] != weight.shape[0] or x.shape[-1] != self.num_features:
            raise ValueError(f"BlockLayerNorm expects [{weight.shape[0]}, ..., {self.num_features}], "
                             f"got {list(x.shape)}")
        shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (self.num_features,)
        return F.layer_norm(x, (self.num_features,), eps=self.eps) * weight.view(shape) + \
            bias.view(shape)

    def extra_repr(self) -> str:
        return f"blocks={self.num_blocks}, features={self.num_features}"


class BlockEmbedding(nn.Module):
    """A lookup table per block: ids [...] -> [B, ..., C], row ids[...] of each block's table."""

    def __init__(self, num_blocks: int, num_embeddings: int, dim: int, std: float = 0.02):
        super().__init__()
        self.num_blocks, self.num_embeddings, self.dim = num_blocks, num_embeddings, dim
        self.weight = nn.Parameter(torch.randn(num_blocks, num_embeddings, dim) * std)

    def forward(self, ids: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        return block_slice(self.weight, blocks)[:, ids]

    def extra_repr(self) -> str:
        return f"blocks={self.num_blocks}, num={self.num_embeddings}, dim={self.dim}"


BLOCK_LAYERS = (BlockLinear, BlockConv2d, BlockBatchNorm, BlockLayerNorm, BlockEmbedding)


def use_ops(module: nn.Module, ops: Ops) -> None:
    """Point every part of `module` that computes with the ops (an `ops` attribute of its own: the
    BlockLinears, the models, their blocks, the attention layers) at `ops`."""
    for sub in module.modules():
        if "ops" in vars(sub):
            sub.ops = ops


def block_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that belong to block layers (leading dimension = block)."""
    params = []
    for sub in module.modules():
        if isinstance(sub, BLOCK_LAYERS):
            params.extend(sub.parameters(recurse=False))
    return params


def softmax_embedding(h: torch.Tensor, head: BlockLinear, embed_weight: torch.Tensor,
                      blocks: slice, ops: Ops) -> torch.Tensor:
    """A DT block's output u_hat = softmax(head(h)) @ W_embed: [B, N, D] -> [B, N, d] in h's dtype
    (docs/method.md section 3): `ops.softmax_head` with keys = `head`'s weight rows."""
    return ops.softmax_head(h, block_slice(head.weight, blocks).to(h.dtype),
                            block_slice(head.bias, blocks).to(h.dtype), embed_weight)
