"""The image model: T NoProp-DT blocks (docs/method.md section 3) as one batched computation
(`layers.py`). The image branch does not depend on z: `image_features` runs once per batch for
every block, also at inference, where `denoise` then runs one block at a time. `ImageModel` adds
the class embedding W_embed, the classifier on z_T and (backprop) the mixing weights of Eqs. 17-19.
NoProp-CT and -FM (section 5) are one such block with the time t as a third input of the fusion;
FM's block outputs a vector field through a linear head instead of a mixture of embeddings.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import (ALL_BLOCKS, BlockBatchNorm, BlockConv2d, BlockLinear, block_slice,
                      softmax_embedding, use_ops)
from ..ops import REFERENCE, Ops
from ..schedule import LearnedSchedule

HIDDEN = 256        # width of the image and latent features and of the first fusion layer
FUSION_HIDDEN = 128  # width of the second fusion layer
CONV_CHANNELS = (32, 64, 128)
CPU_CONV_CHUNK = 1  # blocks whose conv maps a CPU computes at a time (see ConvTower.forward)
TIME_FREQUENCIES = 32  # CT / FM: sin and cos of 1000 t at this many frequencies embed the time t
CONTINUOUS = ("noprop-ct", "noprop-fm")  # the methods of one network with t as an input


def time_encoding(t: torch.Tensor) -> torch.Tensor:
    """[N] times in [0, 1] -> [N, 2 F] sinusoidal features (frequencies 1 .. 1/10000 of 1000 t)."""
    k = torch.arange(TIME_FREQUENCIES, device=t.device, dtype=torch.float32)
    angle = 1000.0 * t.float().unsqueeze(-1) * torch.exp(-math.log(10000.0) * k / TIME_FREQUENCIES)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class _UniformDropout(torch.autograd.Function):
    """Dropout with the mask u < 1 - p, u ~ U[0, 1) (keep probability 1 - p to within 2^-24): the
    distribution of F.dropout at half its CPU time, where bernoulli_ is slow (bench_conv_tower)."""

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
        Less memory traffic than Figure 6 as written: max pooling before the ReLU (they commute),
        ReLUs in place (no conv or pool saves its output), channels_last maps and `_UniformDropout`
        on a CPU (profiling/bench_conv_tower.py; docs/performance.md)."""
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
        """The convs and the FC a few blocks at a time: [B, N, 256] before the BatchNorm. All T
        blocks' maps (128 MB at batch 128 on MNIST) would stream through memory between every op; a
        chunk's stay in cache. Each parameter is split once: split's backward writes all chunks'
        gradients into one tensor, where a slice per chunk would add a whole-parameter gradient."""
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
    """T DT blocks: `forward(x [N, C, H, W], z [B, N, d], W_embed [m, d])` -> u_hat [B, N, d].
    latent_image_shape: set for prototype embeddings (d = C * H * W): z then goes through a conv
    tower of its own instead of the fully connected latent branch. time_input (CT, FM): the time
    t [N] enters the fusion as ReLU(FC256(time_encoding(t))) beside the image and latent
    features; vector_output (FM): the last FC outputs d values, the vector field, not m logits."""

    def __init__(self, num_blocks: int, image_shape: tuple[int, int, int], num_classes: int,
                 embed_dim: int, dropout: float = 0.2,
                 latent_image_shape: tuple[int, int, int] | None = None,
                 time_input: bool = False, vector_output: bool = False):
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
        self.time_input, self.vector_output = time_input, vector_output
        if time_input:
            self.time_fc = BlockLinear(T, 2 * TIME_FREQUENCIES, HIDDEN)
        fused = (3 if time_input else 2) * HIDDEN
        self.fuse_fc1, self.fuse_bn1 = BlockLinear(T, fused, HIDDEN), BlockBatchNorm(T, HIDDEN)
        self.fuse_fc2, self.fuse_bn2 = BlockLinear(T, HIDDEN, FUSION_HIDDEN), BlockBatchNorm(T, FUSION_HIDDEN)
        self.head = BlockLinear(T, FUSION_HIDDEN, embed_dim if vector_output else num_classes)
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

    def time_features(self, t: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """[N] times -> [B, N, 256]."""
        nb = len(range(*blocks.indices(self.num_blocks)))
        encoded = self._cast(time_encoding(t)).unsqueeze(0).expand(nb, -1, -1)
        return F.relu(self.time_fc(encoded, blocks))

    def head_input(self, image_features: torch.Tensor, z: torch.Tensor,
                   blocks: slice = ALL_BLOCKS, t: torch.Tensor | None = None) -> torch.Tensor:
        """Image features [B, N, 256], latents [B, N, d] (and, CT / FM, times t [N]) -> the last
        FC's input [B, N, 128]."""
        z = self._cast(z)
        parts = [image_features, self.latent_features(z, blocks)]
        if self.time_input:
            if t is None:
                raise ValueError("this block takes the time t as an input (NoProp-CT / -FM)")
            parts.append(self.time_features(t, blocks))
        h = torch.cat(parts, dim=-1)                                  # [B, N, 512 or 768]
        h = F.relu(self.fuse_bn1(self.fuse_fc1(h, blocks), blocks))
        return F.relu(self.fuse_bn2(self.fuse_fc2(h, blocks), blocks))

    def denoise(self, image_features: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS, t: torch.Tensor | None = None) -> torch.Tensor:
        """u_hat = softmax(logits) @ W_embed: [B, N, d] in the compute dtype, a convex combination
        of class embeddings; vector_output (FM): the head's output itself, the vector field v."""
        h = self.head_input(image_features, z, blocks, t)
        if self.vector_output:
            return self.head(h, blocks)
        return softmax_embedding(h, self.head, embed_weight, blocks, self.ops)

    def field_on_grid(self, image_features: torch.Tensor, embed_weight: torch.Tensor,
                      times: torch.Tensor):
        """CT / FM inference: `field(z [N, d], k)` = denoise(image_features, z, ., t = times[k])
        [N, d] (k: a 0-dim int64 tensor), with what does not change along the chain computed
        once. The first fusion layer is linear in its input [image, latent, time]: its image
        columns (and bias) are applied to every image and its time columns to every grid time
        [S + 1] here, so a step computes the latent branch, one 256 x 256 product and the rest."""
        w, b = self.fuse_fc1.weight, self.fuse_fc1.bias               # [1, 256, 768], [1, 256]
        w = w.to(image_features.dtype)
        n, H = image_features.shape[1], HIDDEN
        fixed = self.ops.block_linear(image_features, w[..., :H], b.to(w.dtype))  # [1, N, 256]
        # [1, S + 1, 256]: the time columns at every grid time
        timed = self.ops.block_linear(self.time_features(times), w[..., 2 * H:], None)
        latent_weight = w[..., H:2 * H]

        def field(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            latent = self.latent_features(self._cast(z).unsqueeze(0))  # [1, N, 256]
            h = self.ops.block_linear(latent, latent_weight, None)
            h = h + fixed + timed[:, k].unsqueeze(1)
            h = F.relu(self.fuse_bn1(h))
            h = F.relu(self.fuse_bn2(self.fuse_fc2(h)))
            if self.vector_output:
                return self.head(h)[0]
            return softmax_embedding(h, self.head, embed_weight, ALL_BLOCKS, self.ops)[0]
        return field

    # the NoProp maths (noprop.py) asks every task's blocks for their z-independent features
    features = image_features

    def forward(self, x: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        return self.denoise(self.image_features(x, blocks), z, embed_weight, blocks)


def prototype_embeddings(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         chunk: int = 1024) -> torch.Tensor:
    """Each class's training image of smallest median distance to the other images of its class:
    [N, C, H, W] -> [m, C * H * W]; distances in chunks of rows (O(chunk n) memory, not O(n^2))."""
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
    baseline only) the mixing weights a_t = tanh(w_t). CT and FM: one block (num_blocks is not
    used) with t as an input; CT also holds its learned schedule (snr_min, snr_max: its ends; eta:
    the weight of its denoising term)."""

    def __init__(self, method: str, num_blocks: int, image_shape: tuple[int, int, int],
                 num_classes: int, embedding: ClassEmbedding, dropout: float = 0.2,
                 classifier_init: str = "embedding", snr_min: float = 1e-3,
                 snr_max: float = 10.0, eta: float = 0.1):
        super().__init__()
        self.method, self.num_classes = method, num_classes
        self.embedding = embedding
        self.continuous = method in CONTINUOUS
        latent_shape = image_shape if embedding.kind == "prototype" else None
        self.blocks = DenoisingBlocks(1 if self.continuous else num_blocks, image_shape,
                                      num_classes, embedding.dim, dropout,
                                      latent_image_shape=latent_shape,
                                      time_input=self.continuous,
                                      vector_output=method == "noprop-fm")
        if method == "noprop-ct":
            self.noise_schedule = LearnedSchedule(snr_min, snr_max, eta)
        self.classifier = nn.Linear(embedding.dim, num_classes)
        if classifier_init == "embedding":
            self.matched_filter_classifier()
        elif classifier_init != "random":
            raise ValueError(f"unknown classifier init {classifier_init!r}")
        if method == "backprop":
            # w_t with a_t = tanh(w_t) = 0.5 at the start: each step moves half way to u_hat_t
            self.mix_logits = nn.Parameter(torch.full((num_blocks,), math.atanh(0.5)))
