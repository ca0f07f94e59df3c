"""NoProp-LM (T blocks, each a small causal transformer, batched as in `layers.py`) and the
backprop GPT of the same width and total depth (docs/method.md section 7, docs/language.md):

    context branch  h = tok_t[x] + pos_t -> `layers_per_block` pre-LN causal layers -> LayerNorm
    latent branch   g = GELU(FC_D(z_{t-1,i}))
    fusion          q = FC_Dq(LN(GELU(FC_D(concat(h_i, g)))))
    output          u_hat_{t,i} = softmax(q K_t^T + c_t) W_embed  (the softmax-embedding head)

NoProp-FM for the LM (`FlowLanguageBlocks`): one such network with the time t as a third input of
the fusion and a linear head to the vector field v in R^d (continuous.py's maths, one row per
position).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import (ALL_BLOCKS, BlockEmbedding, BlockLayerNorm, BlockLinear, block_slice,
                      softmax_embedding, use_ops)
from ..ops import REFERENCE, Ops
from .image import TIME_FREQUENCIES, ClassEmbedding, DenoisingModel, time_encoding

MAX_QUERY = 128  # the head's query width Dq: the fused softmax head holds D <= 128 in one tile


class CausalLayer(nn.Module):
    """One pre-LN transformer layer (causal self-attention, GELU MLP) for T stacked blocks:
    [B, N, L, D] -> [B, N, L, D]. The GPT runs its T = depth layers one block slice at a time."""

    def __init__(self, num_blocks: int, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.width, self.heads = width, heads
        self.ln1 = BlockLayerNorm(num_blocks, width)
        self.qkv = BlockLinear(num_blocks, width, 3 * width)
        self.proj = BlockLinear(num_blocks, width, width)
        self.ln2 = BlockLayerNorm(num_blocks, width)
        self.fc = BlockLinear(num_blocks, width, mlp_ratio * width)
        self.out = BlockLinear(num_blocks, mlp_ratio * width, width)
        self.ops = REFERENCE  # whose causal_attention the layer uses (`use_ops`)

    def forward(self, h: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        nb, n, length, width = h.shape
        heads = self.heads
        flat = h.reshape(nb, n * length, width)
        qkv = self.qkv(self.ln1(flat, blocks), blocks)                       # [B, N*L, 3D]
        # [B, N*L, 3D] -> 3 x [B*N, H, L, Dh]
        q, k, v = qkv.view(nb * n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        o = self.ops.causal_attention(q, k, v)                               # [B*N, H, L, Dh]
        o = o.transpose(1, 2).reshape(nb, n * length, width)
        flat = flat + self.proj(o, blocks)
        flat = flat + self.out(F.gelu(self.fc(self.ln2(flat, blocks), blocks)), blocks)
        return flat.view(nb, n, length, width)


def gpt_init(module: nn.Module, depth: int) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by
    1 / sqrt(2 depth) so the residual stream's variance does not grow with depth."""
    for name, sub in module.named_modules():
        if isinstance(sub, BlockLinear):
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("proj", "out")) else 0.02
            nn.init.normal_(sub.weight, std=std)
            nn.init.zeros_(sub.bias)


class LanguageBlocks(nn.Module):
    """T NoProp-LM blocks. `features(x)` [B, N*L, D] (z-independent), `denoise(features, z, W)`."""

    def __init__(self, num_blocks: int, vocab_size: int, max_len: int, width: int, heads: int,
                 layers_per_block: int, embed_dim: int):
        super().__init__()
        T = self.num_blocks = num_blocks
        self.max_len, self.query_dim = max_len, min(width, MAX_QUERY)
        self.tok = BlockEmbedding(T, vocab_size, width)
        self.pos = BlockEmbedding(T, max_len, width)
        self.layers = nn.ModuleList(CausalLayer(T, width, heads) for _ in range(layers_per_block))
        self.ln_context = BlockLayerNorm(T, width)
        self.latent_fc = BlockLinear(T, embed_dim, width)
        self.fuse_fc = BlockLinear(T, 2 * width, width)
        self.fuse_ln = BlockLayerNorm(T, width)
        self.query = BlockLinear(T, width, self.query_dim)
        self.head = BlockLinear(T, self.query_dim, vocab_size)  # keys [T, V, Dq] and biases [T, V]
        gpt_init(self, layers_per_block)
        self.ops = REFERENCE
        self.compute_dtype = None

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.compute_dtype is None else t.to(self.compute_dtype)

    def features(self, ids: torch.Tensor, blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """Context branch: token ids [N, L] -> [B, N*L, D]; row n*L + i depends on ids[n, :i+1]."""
        n, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than the model's {self.max_len}")
        positions = torch.arange(length, device=ids.device)
        h = self._cast(self.tok(ids, blocks) + self.pos(positions, blocks).unsqueeze(1))  # [B, N, L, D]
        for layer in self.layers:
            h = layer(h, blocks)
        return self.ln_context(h.reshape(h.shape[0], n * length, -1), blocks)

    def head_input(self, features: torch.Tensor, z: torch.Tensor, blocks: slice = ALL_BLOCKS):
        """Context features [B, M, D] and latents [B, M, d] -> the head's queries [B, M, Dq]."""
        g = F.gelu(self.latent_fc(self._cast(z), blocks))
        h = F.gelu(self.fuse_fc(torch.cat([features, g], dim=-1), blocks))
        return self.query(self.fuse_ln(h, blocks), blocks)

    def denoise(self, features: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS) -> torch.Tensor:
        """u_hat [B, M, d]: a convex combination of token embeddings for every position."""
        return softmax_embedding(self.head_input(features, z, blocks), self.head, embed_weight,
                                 blocks, self.ops)

    def denoise_with_ce(self, features: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                        target: torch.Tensor, blocks: slice = ALL_BLOCKS):
        """(u_hat [B, M, d], ce [B]): `denoise`, and each block's mean cross-entropy of its own
        softmax over the vocabulary, softmax(q K_t^T + c_t), against target [M] (`--block-ce`).
        Block t's term reaches block t's weights alone."""
        q = self.head_input(features, z, blocks)                              # [B, M, Dq]
        u_hat = softmax_embedding(q, self.head, embed_weight, blocks, self.ops)
        keys, biases = block_slice(self.head.weight, blocks), block_slice(self.head.bias, blocks)
        ce = torch.stack([self.ops.linear_cross_entropy(q[b].float(), keys[b], biases[b], target)
                          for b in range(q.shape[0])])
        return u_hat, ce


class FlowLanguageBlocks(LanguageBlocks):
    """NoProp-FM's one network (num_blocks 1 in the batched layers). The context branch has
    `depth` causal layers in sequence; the run gives it num_blocks x layers_per_block, so its
    parameters and training compute match the T blocks' context branches (T x layers_per_block
    layers in all) and the GPT's depth. Fusion and output:

        time branch  tau = GELU(FC_D(time_encoding(t)))
        fusion       h = LN(GELU(FC_D(concat(h_i, g, tau))))
        output       v(z_t, x_{<=i}, t) = FC_d(h)                 (a vector field in R^d)

    The context features do not depend on z or t: the ODE computes them once per window."""

    def __init__(self, vocab_size: int, max_len: int, width: int, heads: int, depth: int,
                 embed_dim: int):
        super().__init__(1, vocab_size, max_len, width, heads, depth, embed_dim)
        del self.query  # the softmax-embedding head's query: FM's head is linear
        self.time_fc = BlockLinear(1, 2 * TIME_FREQUENCIES, width)
        self.fuse_fc = BlockLinear(1, 3 * width, width)
        self.head = BlockLinear(1, width, embed_dim)
        gpt_init(self, depth)

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """[M] times -> [1, M, D]."""
        return F.gelu(self.time_fc(self._cast(time_encoding(t)).unsqueeze(0)))

    def denoise(self, features: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor,
                blocks: slice = ALL_BLOCKS, t: torch.Tensor | None = None) -> torch.Tensor:
        """v [1, M, d] for context features [1, M, D], latents z_t [1, M, d] and times t [M]."""
        if t is None:
            raise ValueError("NoProp-FM's network takes the time t as an input")
        g = F.gelu(self.latent_fc(self._cast(z)))
        h = F.gelu(self.fuse_fc(torch.cat([features, g, self.time_features(t)], dim=-1)))
        return self.head(self.fuse_ln(h))

    def field_on_grid(self, features: torch.Tensor, embed_weight: torch.Tensor,
                      times: torch.Tensor):
        """The ODE's `field(z [M, d], k)` = denoise(features, z, ., t = times[k]) [M, d] (k: a
        0-dim int64 tensor). The fusion's first FC is linear in [context, latent, time]: its
        context columns (and bias) are applied once here, its time columns once per grid time
        [S + 1], so a step computes the latent FC, one D x D product and the head."""
        w = self.fuse_fc.weight.to(features.dtype)                   # [1, D, 3D]
        width = features.shape[-1]
        fixed = self.ops.block_linear(features, w[..., :width],
                                      self.fuse_fc.bias.to(w.dtype))  # [1, M, D]
        # [1, S + 1, D]: the time columns at every grid time
        timed = self.ops.block_linear(self.time_features(times), w[..., 2 * width:], None)
        latent_weight = w[..., width:2 * width]

        def field(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            g = F.gelu(self.latent_fc(self._cast(z).unsqueeze(0)))   # [1, M, D]
            h = self.ops.block_linear(g, latent_weight, None) + fixed + timed[:, k].unsqueeze(1)
            return self.head(self.fuse_ln(F.gelu(h)))[0]
        return field


class LanguageModel(DenoisingModel):
    """NoProp-LM: the T blocks with what they share, the token embedding W_embed [V, d] (the
    targets) and the linear classifier on z_T (vocabulary logits)."""

    method = "noprop"

    def __init__(self, num_blocks: int, vocab_size: int, max_len: int, width: int, heads: int,
                 layers_per_block: int, embed_dim: int, embedding: str = "learned"):
        """embedding: "learned" (W_embed [V, embed_dim], rows of unit norm on average, trained
        jointly or replaced by pre-trained ones) or "onehot" (the identity, d = V, fixed)."""
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        if embedding == "onehot":
            embed_dim = vocab_size
            self.embedding = ClassEmbedding("onehot", vocab_size)
        else:
            self.embedding = ClassEmbedding("learned", vocab_size, embed_dim)
            with torch.no_grad():  # rows of unit norm on average, like the image task's embeddings
                self.embedding.weight.copy_(torch.randn(vocab_size, embed_dim) / math.sqrt(embed_dim))
        self.blocks = self.build_blocks(num_blocks, vocab_size, max_len, width, heads,
                                        layers_per_block, embed_dim)
        self.classifier = nn.Linear(embed_dim, vocab_size)
        self.matched_filter_classifier()  # (again after pre-trained embeddings replace W_embed)


    @staticmethod
    def build_blocks(*args) -> LanguageBlocks:
        return LanguageBlocks(*args)


class FlowLanguageModel(LanguageModel):
    """NoProp-FM on tokens: `FlowLanguageBlocks` (one network of num_blocks x layers_per_block
    causal layers) with the same W_embed and classifier; trained by `continuous.fm_loss`, read
    by the ODE (`continuous.fm_ode`) and the classifier on z_1."""

    method = "noprop-fm"

    @staticmethod
    def build_blocks(num_blocks, vocab_size, max_len, width, heads, layers_per_block,
                     embed_dim) -> FlowLanguageBlocks:
        return FlowLanguageBlocks(vocab_size, max_len, width, heads,
                                  num_blocks * layers_per_block, embed_dim)


class GPT(nn.Module):
    """The backprop baseline: a GPT of `depth` layers and width D, trained end to end."""

    method = "backprop"

    def __init__(self, depth: int, vocab_size: int, max_len: int, width: int, heads: int):
        super().__init__()
        self.vocab_size, self.max_len, self.depth = vocab_size, max_len, depth
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(max_len, width)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = CausalLayer(depth, width, heads)  # depth layers, stacked, run in sequence
        self.ln_f = nn.LayerNorm(width)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))
        gpt_init(self, depth)
        self.ops, self.compute_dtype_ = REFERENCE, None

    @property
    def num_blocks(self) -> int:
        """The stacked layers' leading dimension (what the optimiser keeps a step count for)."""
        return self.depth

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_dtype_ or self.tok.weight.dtype

    def configure(self, ops: Ops = REFERENCE, compute_dtype: torch.dtype | None = None) -> "GPT":
        use_ops(self, ops)
        self.compute_dtype_ = compute_dtype
        return self

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> final hidden states [N*L, D] (fp32 after the last LayerNorm)."""
        n, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens is longer than the model's {self.max_len}")
        positions = torch.arange(length, device=ids.device)
        h = (self.tok(ids) + self.pos(positions)).to(self.compute_dtype).unsqueeze(0)  # [1, N, L, D]
        for layer in range(self.depth):
            h = self.layers(h, slice(layer, layer + 1))
        return self.ln_f(h.reshape(n * length, -1).float())

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, L] -> [N*L, V]; for sampling and tests (fused training never forms all logits)."""
        return F.linear(self.hidden(ids), self.tok.weight, self.lm_bias)
