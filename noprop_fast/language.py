"""The language task's loss, validation loss and sampling, for NoProp-LM and the GPT baseline.

A batch is x, y [N, L] token ids with y the next tokens (y[:, i] = x[:, i + 1] within a window).
Every position is one row of the image task's maths: the NoProp loss is `methods.noprop_loss` with
the N*L positions as its examples, the targets u = W_embed[y] (docs/method.md section 7).

Validation loss (nats per token): the Eq. 3 chain at every position with the context teacher-forced
(`methods.noprop_chain`), the classifier's vocabulary probabilities on z_T, averaged over K chains,
-log of the probability of y: the same quantity as the GPT's validation loss on the same tokens
(see `validation_loss`). y is read only after the chains ran: their inputs are x and the noise.

Sampling: the chain at the last position of the context (its features alone), the classifier's
logits scaled by 1 / temperature, the top k kept, one token drawn, appended; repeated.
"""
import math

import torch
import torch.nn.functional as F

from .layers import ALL_BLOCKS
from .methods import chain_from_features, noprop_chain, noprop_loss
from .nvtx_ranges import phase
from .ops.chunked_ce import cross_entropy_rows
from .schedule import NoiseSchedule


def lm_loss(model, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
            noise=None) -> tuple[torch.Tensor, dict]:
    """(loss, parts): NoProp's block, CE and KL terms over all positions, or the GPT's CE."""
    if model.method == "noprop":
        return noprop_loss(model, schedule, x, y.reshape(-1), ALL_BLOCKS, noise)
    with phase("forward"):
        hidden = model.hidden(x)                              # [N*L, D]
    with phase("loss"):  # the vocabulary head is part of the loss: chunked on the fused path
        ce = model.ops.linear_cross_entropy(hidden, model.tok.weight, model.lm_bias, y.reshape(-1))
    return ce, {"ce": ce.detach()}


@torch.no_grad()
def final_states(model, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The input of the vocabulary classifier at every position, [N*L, d or D]: NoProp's z_T from
    the chain, or the GPT's last hidden states. Row n*L + i depends on x[n, :i+1] only."""
    if model.method == "noprop":
        return noprop_chain(model, schedule, x, stochastic, generator)
    return model.hidden(x)


def _classifier(model) -> tuple[torch.Tensor, torch.Tensor]:
    if model.method == "noprop":
        return model.classifier.weight, model.classifier.bias
    return model.tok.weight, model.lm_bias


@torch.no_grad()
def position_logits(model, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Vocabulary logits at every position, [N*L, V] (small inputs only: tests and sampling)."""
    weight, bias = _classifier(model)
    return F.linear(final_states(model, schedule, x, stochastic, generator).float(), weight, bias)


@torch.no_grad()
def validation_loss(model, schedule: NoiseSchedule, batches, stochastic: bool = True,
                    seed: int = 0, chains: int = 1, chain=chain_from_features) -> dict:
    """The validation loss over the (x, y) batches, in eval mode, with the chains' noise drawn from
    `seed` (the same numbers at every evaluation). Returns {"val_loss", "val_loss_one_chain",
    "val_tokens"}, losses in nats per token.

    NoProp-LM is a generative chain: z_T is drawn by Eq. 3 and the classifier gives p(y | z_T), so
    the model's probability of y is the mean of p(y | z_T) over the chain's draws. `val_loss` is
    -log of that mean over `chains` independent chains per position (in expectation an upper bound
    on the model's loss, tightening as chains grow); `val_loss_one_chain` is the first chain's
    cross-entropy alone (docs/method.md section 7's recipe with one chain). The GPT has no chain: both
    are its cross-entropy. `chain`: `chain_from_features` or one with its signature (a
    multi-process run's chain across the processes that hold the blocks, distributed.py).
    """
    was_training = model.training
    model.eval()
    weight, bias = _classifier(model)
    totals, tokens, generator = None, 0, None
    for x, y in batches:
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        target = y.reshape(-1)
        if model.method == "noprop":
            features = model.blocks.features(x)               # [T, N*L, D], shared by the chains
            losses = torch.stack([
                cross_entropy_rows(chain(model, schedule, features, stochastic,
                                         generator).float(), weight, bias, target)
                for _ in range(chains)])                      # [K, N*L]: -log p(y | z_T^k)
            mixture = math.log(chains) - torch.logsumexp(-losses, dim=0)
            part = torch.stack([mixture.sum(), losses[0].sum()])
        else:
            ce = cross_entropy_rows(model.hidden(x), weight, bias, target).sum()
            part = torch.stack([ce, ce])
        totals = part if totals is None else totals + part
        tokens += target.numel()
    model.train(was_training)
    if tokens == 0:
        raise ValueError("validation_loss: no validation batches")
    mixture_sum, one_sum = totals.tolist()  # host sync: once per evaluation
    return {"val_loss": mixture_sum / tokens, "val_loss_one_chain": one_sum / tokens,
            "val_tokens": tokens}


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, prompt: list[int], num_tokens: int,
           temperature: float = 1.0, top_k: int = 0, stochastic: bool = True,
           generator: torch.Generator | None = None, chain=chain_from_features) -> list[int]:
    """`num_tokens` tokens continuing `prompt` (a non-empty list of ids), one chain per token
    (`chain`: as in `validation_loss`)."""
    if not prompt:
        raise ValueError("sample: the prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = list(prompt)
    weight, bias = _classifier(model)
    for _ in range(num_tokens):
        x = torch.tensor([ids[-model.max_len:]], device=device)
        if model.method == "noprop":
            last = model.blocks.features(x)[:, -1:]              # [T, 1, D]: the last position
            state = chain(model, schedule, last, stochastic, generator)
        else:
            state = model.hidden(x)[-1:]
        logits = F.linear(state.float(), weight, bias)[0] / temperature   # [V]
        if 0 < top_k < logits.shape[0]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids.append(int(token.item()))
    model.train(was_training)
    return ids[len(prompt):]
