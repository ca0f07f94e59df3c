"""The DT blocks written the usual way: T plain PyTorch modules (paper Figure 6), run one after
another. The reference `models.image.DenoisingBlocks` is tested against, block by block, and the
benchmarks' "separate-modules loop". A `DTBlock` has one batched block's layers under the same
names, so block t's copy of a stacked [T, ...] tensor is the [...] tensor under the same state-dict
key (`separate_blocks_from`, `batched_from_separate`); nn.BatchNorm1d's `num_batches_tracked`
matters only with momentum=None, which neither form uses, and the batched form does not keep it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image import CONV_CHANNELS, FUSION_HIDDEN, HIDDEN, DenoisingBlocks

BN_COUNTER = "num_batches_tracked"  # nn.BatchNorm1d's step counter, absent from the batched form


class ConvBranch(nn.Module):
    """One block's conv tower: [N, C, H, W] -> [N, 256]."""

    def __init__(self, image_shape: tuple[int, int, int], dropout: float):
        super().__init__()
        in_channels, height, width = image_shape
        c1, c2, c3 = CONV_CHANNELS
        flat_features = c3 * (height // 4) * (width // 4)  # after two 2x2 max pools (floor)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(flat_features, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.max_pool2d(F.relu(self.conv1(x)), 2))
        h = self.dropout(F.relu(self.conv2(h)))
        h = self.dropout(F.max_pool2d(F.relu(self.conv3(h)), 2))
        return self.bn(self.fc(h.flatten(1)))  # [N, 128, h, w] -> [N, 128 * h * w] -> [N, 256]


class DTBlock(nn.Module):
    """One NoProp-DT block: `forward(x [N, C, H, W], z [N, d], W_embed [m, d])` -> u_hat [N, d].
    latent_image_shape: as for `DenoisingBlocks` (prototype embeddings)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, embed_dim: int,
                 dropout: float = 0.2, latent_image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.latent_image_shape = latent_image_shape
        self.image_tower = ConvBranch(image_shape, dropout)
        if latent_image_shape is not None:
            if math.prod(latent_image_shape) != embed_dim:
                raise ValueError(f"latent image shape {latent_image_shape} does not hold "
                                 f"d={embed_dim}")
            self.latent_tower = ConvBranch(latent_image_shape, dropout)
        else:
            self.latent_fc1, self.latent_bn1 = nn.Linear(embed_dim, HIDDEN), nn.BatchNorm1d(HIDDEN)
            self.latent_fc2, self.latent_bn2 = nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN)
            self.latent_fc3, self.latent_bn3 = nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN)
        self.fuse_fc1, self.fuse_bn1 = nn.Linear(2 * HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN)
        self.fuse_fc2 = nn.Linear(HIDDEN, FUSION_HIDDEN)
        self.fuse_bn2 = nn.BatchNorm1d(FUSION_HIDDEN)
        self.head = nn.Linear(FUSION_HIDDEN, num_classes)

    def latent_features(self, z: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [N, 256]: h1 = ReLU(BN(FC(z))), h = BN(FC(ReLU(BN(FC(h1))))) + h1."""
        if self.latent_image_shape is not None:
            return self.latent_tower(z.reshape(z.shape[0], *self.latent_image_shape))
        h1 = F.relu(self.latent_bn1(self.latent_fc1(z)))
        h = F.relu(self.latent_bn2(self.latent_fc2(h1)))
        return self.latent_bn3(self.latent_fc3(h)) + h1

    def forward(self, x: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        """u_hat = softmax(logits) @ W_embed: [N, d]."""
        h = torch.cat([self.image_tower(x), self.latent_features(z)], dim=-1)  # [N, 512]
        h = F.relu(self.fuse_bn1(self.fuse_fc1(h)))
        h = F.relu(self.fuse_bn2(self.fuse_fc2(h)))
        return torch.softmax(self.head(h), dim=-1) @ embed_weight  # logits [N, m]


def separate_blocks_from(batched: DenoisingBlocks) -> nn.ModuleList:
    """T DTBlocks holding copies (no shared storage) of block t's slice of every stacked parameter
    and buffer, in `batched`'s dtype, device and train/eval mode."""
    state = batched.state_dict()
    reference = next(iter(state.values()))
    blocks = nn.ModuleList()
    for t in range(batched.num_blocks):
        block = DTBlock(batched.image_shape, batched.num_classes, batched.embed_dim,
                        batched.dropout, batched.latent_image_shape)
        block = block.to(device=reference.device, dtype=reference.dtype)
        own_slices = {key: value[t] for key, value in state.items()}
        result = block.load_state_dict(own_slices, strict=False)
        missing = [key for key in result.missing_keys if not key.endswith(BN_COUNTER)]
        if missing or result.unexpected_keys:
            raise ValueError(f"DTBlock and DenoisingBlocks disagree: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
        blocks.append(block.train(batched.training))
    return blocks


def batched_from_separate(blocks: list[DTBlock]) -> dict[str, torch.Tensor]:
    """The reverse: a DenoisingBlocks state dict (for its `load_state_dict`), block t's tensors
    stacked at index t."""
    states = [block.state_dict() for block in blocks]
    return {key: torch.stack([state[key] for state in states])
            for key in states[0] if not key.endswith(BN_COUNTER)}
