"""Masked-LM pre-training of the token embedding W_embed (`--embed-init mlm`; docs/language.md):
pre-trained and frozen, the targets the blocks denoise towards are fixed and place tokens used
alike near each other. A small bidirectional encoder reads windows with 15% of tokens masked (a
learned mask vector for their embedding) and predicts them, W_embed being the input and the output
table:

    e_i = mask ? m : W_embed[x_i];   h = Encoder(FC_D(e) + pos);   logits_i = FC_d(h_i) W_embed^T + b

After `steps` AdamW steps the rows are rescaled to mean norm 1 (the scale the noise schedule is set
for) and returned; the encoder is dropped. Nothing of the validation split is read.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

MASK_RATE = 0.15


class MaskedLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, max_len: int, width: int = 128, heads: int = 4):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(vocab_size, embed_dim) / embed_dim ** 0.5)
        self.mask = nn.Parameter(torch.zeros(embed_dim))
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.up = nn.Linear(embed_dim, width)
        self.encoder = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.down = nn.Linear(width, embed_dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy at the masked positions of x [N, L] (at least one position is masked)."""
        masked = torch.rand(x.shape, device=x.device, generator=generator) < MASK_RATE
        masked[:, 0] |= ~masked.any(dim=1)  # every window predicts something
        e = torch.where(masked.unsqueeze(-1), self.mask, self.embedding[x])      # [N, L, d]
        h = self.encoder(self.up(e) + self.pos[:x.shape[1]])                     # [N, L, D]
        logits = F.linear(self.down(h[masked]), self.embedding, self.bias)       # [masked, V]
        return F.cross_entropy(logits, x[masked])


def pretrain_embeddings(batches, vocab_size: int, embed_dim: int, max_len: int, steps: int,
                        device: torch.device, seed: int = 0, lr: float = 1e-3, show_progress: bool = True) -> torch.Tensor:
    """W_embed [V, d] after `steps` masked-LM steps on `batches` (anything with `.next()` ->
    (x, y) token batches); rows rescaled to mean norm 1."""
    torch.manual_seed(seed)
    model = MaskedLM(vocab_size, embed_dim, max_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = tqdm(range(steps), desc="masked-LM embeddings", unit="step", leave=False,
               disable=not show_progress, file=sys.stderr)
    loss = None
    for _ in bar:
        x, _ = batches.next()
        loss = model.loss(x, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if show_progress:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"masked-LM embeddings: {steps} steps, last loss {loss.item():.3f}", flush=True)
    weight = model.embedding.detach()
    return weight / weight.norm(dim=1).mean()
