"""The image model: T NoProp-DT blocks (paper Figure 6, docs/method.md section 3) run as one
batched computation in the block layers of `layers.py`. The image branch does not depend on z, so
it is computed once per batch for every block (`image_features`), also at inference where the
latent part then runs one block at a time (`denoise` with a one-block slice).

`configure` picks the ops (`noprop_fast.ops`: the block FCs and the softmax-embedding output) and
the dtype the blocks compute in (images and latents cast on entry, weights in each layer).
`ImageModel` adds what the blocks share: the class embedding W_embed, the linear classifier on z_T,
and, for the backprop baseline, the learnable mixing weights a_t = tanh(w_t) of Eqs. 17-19.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import (ALL_BLOCKS, BlockBatchNorm, BlockConv2d, BlockLinear, block_slice,
                      softmax_embedding, use_ops)
from ..ops import REFERENCE, Ops

HIDDEN = 256        # width of the image and latent features and of the first fusion layer
FUSION_HIDDEN = 128  # width of the second fusion layer
CONV_CHANNELS = (32, 64, 128)
CPU_CONV_CHUNK = 1  # blocks whose conv maps a CPU computes at a time (see ConvTower.forward)


class _UniformDropout(torch.autograd.Function):
    """Dropout whose mask is drawn as u < 1 - p with u ~ U[0, 1) (float32 u: the keep probability
    is 1 - p to within 2^-24), the mask scaled in place and saved for the backward.

    The same distribution as F.dropout, drawn faster on a CPU, where bernoulli_ is slow: half
    F.dropout's time at [128, 64, 14, 14] (profiling/bench_conv_tower.py)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, p: float) -> torch.Tensor:
        mask = torch.rand_like(h).lt_(1.0 - p).mul_(1.0 / (1.0 - p))  # 0 or 1 / (1 - p)
        ctx.save_for_backward(mask)
        return h * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class ConvTower(nn.Module):
    """The DT block's conv branch for T blocks: [N, C_in(*B), H, W] -> features [B, N, 256]."""

    def __init__(self, num_blocks: int, image_shape: tuple[int, int, int], dropout: float,
                 shared_input: bool):
        super().__init__()
        c, h, w = image_shape
        c1, c2, c3 = CONV_CHANNELS
        self.conv1 = BlockConv2d(num_blocks, c, c1, shared_input=shared_input)
        self.conv2 = BlockConv2d(num_blocks, c1, c2, shared_input=False)
        self.conv3 = BlockConv2d(num_blocks, c2, c3, shared_input=False)
        self.flat_features = c3 * (h // 4) * (w // 4)  # two 2x2 max pools (floor)
        if h < 4 or w < 4:
            raise ValueError(f"images must be at least 4x4 for two 2x2 pools, got {h}x{w}")
        self.fc = BlockLinear(num_blocks, self.flat_features, HIDDEN)
        self.bn = BlockBatchNorm(num_blocks, HIDDEN)
        self.dropout = nn.Dropout(dropout)

    def conv_maps(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS, params=None) -> torch.Tensor:
        """The convolutions, pools and dropouts: [N, C_in(*B), H, W] -> [N, B * 128, H/4, W/4].
        params: the three convs' (weight, bias) for the slice's blocks, where the caller has them.

        The block of Figure 6, computed with less memory traffic: max pooling before the ReLU
        (max and ReLU commute, as ReLU is monotone; the ReLU then touches a quarter of the
        values), each ReLU in place (neither a conv nor a pool saves its output for backward),
        and on a CPU the maps channels_last, where max pooling is faster than on NCHW maps; the
        dropout there is `_UniformDropout` (profiling/bench_conv_tower.py measures the parts).
        Together 1.3x the separate-modules loop's images/s, whose tower is written as the block
        reads (docs/performance.md)."""
        convs = (self.conv1, self.conv2, self.conv3)
        if params is None:
            params = [(block_slice(c.weight, blocks), block_slice(c.bias, blocks)) for c in convs]
        (w1, b1), (w2, b2), (w3, b3) = params
        h = self.conv1.forward_with(x, w1, b1)
        if h.device.type == "cpu":
            h = h.contiguous(memory_format=torch.channels_last)
        h = self._dropout(F.relu(F.max_pool2d(h, 2), inplace=True))
        h = self._dropout(F.relu(self.conv2.forward_with(h, w2, b2), inplace=True))
        return self._dropout(F.relu(F.max_pool2d(self.conv3.forward_with(h, w3, b3), 2),
                                    inplace=True))

    def _dropout(self, h: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p
        if h.device.type == "cpu" and self.training and p > 0:
            return _UniformDropout.apply(h, p)
        return self.dropout(h)

    def forward(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        n = x.shape[0]
        start, stop, _ = blocks.indices(self.conv1.num_blocks)
        if x.device.type == "cpu" and stop - start > CPU_CONV_CHUNK:
            return self.bn(self._cpu_chunked_fc(x, blocks, start, stop), blocks)
        h = self.conv_maps(x, blocks)
        nb = h.shape[1] // CONV_CHANNELS[2]
        # [N, B * 128, h, w] -> [B, N, 128 * h * w]: channels are block-major
        h = h.reshape(n, nb, self.flat_features).transpose(0, 1)
        return self.bn(self.fc(h, blocks), blocks)

    def _cpu_chunked_fc(self, x: torch.Tensor, blocks: slice, start: int, stop: int) -> torch.Tensor:
        """The convs and the FC a few blocks at a time: [B, N, 256] before the BatchNorm.

        On a CPU the maps of all T blocks at once ([N, T * 32, H, W]: 128 MB at batch 128 on
        MNIST) stream through memory between every conv, ReLU, pool and dropout; a few blocks at a
        time stay in cache. Each chunk goes on through the FC, so the [N, B * 128, h, w] maps are
        never concatenated nor transposed. Each parameter is split into its chunks once: the
        backward of `split` writes every chunk's gradient into one tensor, where a slice per chunk
        would zero-fill and add a whole-parameter gradient per chunk. The same maths: each block's
        maps and features are its own.
        """
        n = x.shape[0]
        sizes = [min(CPU_CONV_CHUNK, stop - first) for first in range(start, stop, CPU_CONV_CHUNK)]
        layers = (self.conv1, self.conv2, self.conv3, self.fc)
        chunked = [(block_slice(layer.weight, blocks).split(sizes),
                    block_slice(layer.bias, blocks).split(sizes)) for layer in layers]
        per_block = None if self.conv1.shared_input else x.shape[1] // (stop - start)
        features, first = [], 0
        for i, size in enumerate(sizes):
            xc = x if per_block is None else x[:, first * per_block:(first + size) * per_block]
            params = [(weights[i], biases[i]) for weights, biases in chunked]
            h = self.conv_maps(xc, params=params[:3])
            # [N, size * 128, h, w] -> [size, N, 128 * h * w]: channels are block-major
            h = h.reshape(n, size, self.flat_features).transpose(0, 1)
            features.append(self.fc.forward_with(h, *params[3]))
            first += size
        return torch.cat(features)                                  # [B, N, 256]


class DenoisingBlocks(nn.Module):
    """T DT blocks. `forward(x, z, W_embed)` -> u_hat [B, N, d] for the blocks in the slice.

    x: [N, C, H, W] images; z: [B, N, d] each block's noisy latent; W_embed: [m, d].
    latent_image_shape: set for prototype embeddings (d = C * H * W): z then goes through a conv
    tower of its own instead of the fully connected latent branch.
    """

    def __init__(self, num_blocks: int, image_shape: tuple[int, int, int], num_classes: int,
                 embed_dim: int, dropout: float = 0.2,
                 latent_image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        T = self.num_blocks = num_blocks
        self.image_shape, self.num_classes, self.dropout = image_shape, num_classes, dropout
        self.embed_dim, self.latent_image_shape = embed_dim, latent_image_shape
        self.image_tower = ConvTower(T, image_shape, dropout, shared_input=True)
        if latent_image_shape is not None:
            if math.prod(latent_image_shape) != embed_dim:
                raise ValueError(f"latent image shape {latent_image_shape} does not hold d={embed_dim}")
            self.latent_tower = ConvTower(T, latent_image_shape, dropout, shared_input=False)
        else:
            self.latent_fc1, self.latent_bn1 = BlockLinear(T, embed_dim, HIDDEN), BlockBatchNorm(T, HIDDEN)
            self.latent_fc2, self.latent_bn2 = BlockLinear(T, HIDDEN, HIDDEN), BlockBatchNorm(T, HIDDEN)
            self.latent_fc3, self.latent_bn3 = BlockLinear(T, HIDDEN, HIDDEN), BlockBatchNorm(T, HIDDEN)
        self.fuse_fc1, self.fuse_bn1 = BlockLinear(T, 2 * HIDDEN, HIDDEN), BlockBatchNorm(T, HIDDEN)
        self.fuse_fc2, self.fuse_bn2 = BlockLinear(T, HIDDEN, FUSION_HIDDEN), BlockBatchNorm(T, FUSION_HIDDEN)
        self.head = BlockLinear(T, FUSION_HIDDEN, num_classes)
        self.ops = REFERENCE
        self.compute_dtype = None  # the blocks' activations; None: the parameters' own dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.compute_dtype is None else t.to(self.compute_dtype)

    def image_features(self, x: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """[N, C, H, W] -> [B, N, 256]; independent of z, so computed once per batch."""
        return self.image_tower(self._cast(x), blocks)

    def latent_features(self, z: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """[B, N, d] -> [B, N, 256]."""
        if self.latent_image_shape is not None:
            nb, n, _ = z.shape
            # [B, N, d] -> [N, B * C, H, W]: each block's latent as an image, block-major channels
            c, h, w = self.latent_image_shape
            return self.latent_tower(z.transpose(0, 1).reshape(n, nb * c, h, w), blocks)
        h1 = F.relu(self.latent_bn1(self.latent_fc1(z, blocks), blocks))
        h = F.relu(self.latent_bn2(self.latent_fc2(h1, blocks), blocks))
        return self.latent_bn3(self.latent_fc3(h, blocks), blocks) + h1

    def head_input(self, image_features: torch.Tensor, z: torch.Tensor,
                   blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """Image features [B, N, 256] and latents [B, N, d] -> the last FC's input [B, N, 128]."""
        z = self._cast(z)
        h = torch.cat([image_features, self.latent_features(z, blocks)], dim=-1)  # [B, N, 512]
        h = F.relu(self.fuse_bn1(self.fuse_fc1(h, blocks), blocks))
        return F.relu(self.fuse_bn2(self.fuse_fc2(h, blocks), blocks))

    def denoise(self, image_features: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """u_hat = softmax(logits) @ W_embed: [B, N, d] in the compute dtype, a convex combination
        of class embeddings."""
        return softmax_embedding(self.head_input(image_features, z, blocks), self.head, embed_weight,
                                 blocks, self.ops)

    # the NoProp maths (noprop.py) asks every task's blocks for their z-independent features
    features = image_features

    def forward(self, x: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        return self.denoise(self.image_features(x, blocks), z, embed_weight, blocks)


def prototype_embeddings(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         chunk: int = 1024) -> torch.Tensor:
    """Each class's training image of smallest median distance to the other images of its class.

    images: [N, C, H, W]; returns [m, C * H * W]. Distances are computed in chunks of rows so that a
    class of n images needs O(chunk * n) memory, not O(n^2).
    """
    flat = images.reshape(images.shape[0], -1).float()
    rows = []
    for k in range(num_classes):
        members = flat[labels == k]
        if members.shape[0] == 0:
            raise ValueError(f"class {k} has no training image to build its prototype from")
        if members.shape[0] == 1:
            rows.append(members[0])
            continue
        # each row's sorted distances start with its zero distance to itself: drop it, so the
        # median is over the *other* images (for an even count the two medians differ)
        medians = torch.cat([torch.cdist(members[i:i + chunk], members).sort(dim=1).values[:, 1:]
                             .median(dim=1).values for i in range(0, members.shape[0], chunk)])
        rows.append(members[medians.argmin()])
    return torch.stack(rows)


class ClassEmbedding(nn.Module):
    """W_embed [m, d]: one-hot (fixed identity, d = m), learned (d = dim, orthogonal init), or
    prototype (d = C * H * W, initialised with each class's prototype image, learned)."""

    KINDS = ("onehot", "learned", "prototype")

    def __init__(self, kind: str, num_classes: int, dim: int = 20,
                 prototypes: torch.Tensor | None = None):
        super().__init__()
        self.kind = kind
        if kind == "onehot":
            self.register_buffer("weight", torch.eye(num_classes))
        elif kind == "learned":
            self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(num_classes, dim)))
        elif kind == "prototype":
            if prototypes is None or prototypes.shape[0] != num_classes:
                raise ValueError("prototype embeddings need one prototype image per class")
            self.weight = nn.Parameter(prototypes.clone().float())
        else:
            raise ValueError(f"unknown embedding {kind!r}; expected one of {self.KINDS}")

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.weight[labels]


class DenoisingModel(nn.Module):
    """What every task's NoProp model has: `blocks` (with `num_blocks`, `ops`, `compute_dtype`),
    the embedding W_embed and the linear classifier on z_T (set by the subclass)."""

    def configure(self, ops: Ops = REFERENCE, compute_dtype: torch.dtype | None = None):
        """Choose the ops and the blocks' compute dtype (None: the parameters' own). Neither
        changes a parameter: a checkpoint loads into any backend and precision."""
        use_ops(self, ops)
        self.blocks.compute_dtype = compute_dtype
        return self

    def matched_filter_classifier(self) -> None:
        """Row y = u_y / ||u_y||^2, bias 0: z = u_y gives logit 1 for class y."""
        with torch.no_grad():
            w = self.embedding.weight.detach()
            self.classifier.weight.copy_(w / w.square().sum(1, keepdim=True).clamp_min(1e-12))
            self.classifier.bias.zero_()

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def ops(self) -> Ops:
        return self.blocks.ops

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.blocks.compute_dtype or self.embedding.weight.dtype


class ImageModel(DenoisingModel):
    """The DT blocks with what they share: class embedding, classifier on z_T, and (backprop
    baseline only) the mixing weights a_t = tanh(w_t)."""

    def __init__(self, method: str, num_blocks: int, image_shape: tuple[int, int, int],
                 num_classes: int, embedding: ClassEmbedding, dropout: float = 0.2,
                 classifier_init: str = "embedding"):
        super().__init__()
        self.method, self.num_classes = method, num_classes
        self.embedding = embedding
        latent_shape = image_shape if embedding.kind == "prototype" else None
        self.blocks = DenoisingBlocks(num_blocks, image_shape, num_classes, embedding.dim, dropout,
                                      latent_image_shape=latent_shape)
        self.classifier = nn.Linear(embedding.dim, num_classes)
        if classifier_init == "embedding":
            self.matched_filter_classifier()
        elif classifier_init != "random":
            raise ValueError(f"unknown classifier init {classifier_init!r}")
        if method == "backprop":
            # w_t with a_t = tanh(w_t) = 0.5 at the start: each step moves half way to u_hat_t
            self.mix_logits = nn.Parameter(torch.full((num_blocks,), math.atanh(0.5)))
