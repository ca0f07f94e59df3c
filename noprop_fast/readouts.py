"""NoProp-LM's predictive distributions (docs/language.md, "Readouts"). One Eq. 3 chain, run with
the context teacher-forced, is scored at every step: block t's own softmax over the vocabulary,
softmax(q_t K_t^T + c_t) with q_t its queries given the context and z_{t-1}, and at the end the
classifier on z_T. A readout is the mean, over K chains and its components, of those
distributions:

    classifier   p(y | z_T)                        (the paper's; one component per chain)
    last         p_T(y | x, z_{T-1})               (the last block's softmax)
    first        p_1(y | x, z_0)                   (the first block's softmax, z_0 pure noise)
    blocks       1/T sum_t p_t(y | x, z_{t-1})     (every block's softmax along the chain)
    fitted       sum_c w_c p_c                     (the T blocks and the classifier, weights w
                                                    fitted on held-back training tokens)

The log of that mean is what `val_loss` reports (K chains) and `val_loss_one_chain` (K = 1). A
calibrated readout divides every component's logits by a temperature fitted on held-back training
tokens, never on validation tokens; `fitted` exists only where tokens are held back.
"""
import math

import torch
import torch.nn.functional as F

from .layers import softmax_embedding
from .ops.chunked_ce import cross_entropy_rows
from .schedule import denoise_step

READOUTS = ("classifier", "last", "first", "blocks")  # scored from the chains alone
CHOICES = READOUTS + ("fitted",)  # and the mixture fitted on held-back tokens
# what a calibrated readout chooses from: 2^-2 .. 2^2 in steps of 2^(1/8), 1 included
TEMPERATURES = 2.0 ** torch.linspace(-2.0, 2.0, 33)
ONE = 16  # TEMPERATURES[ONE] == 1


def chain_scores(model, schedule, features: torch.Tensor, score, stochastic: bool = True,
                 generator: torch.Generator | None = None) -> list:
    """One chain over features [T, M, D] (the draws of `noprop.chain_from_features`, so the same
    z_t): score(h, weight, bias), block t's softmax being softmax(h weight^T + bias), for each
    block's queries at its step, then for z_T and the classifier; T + 1 results."""
    blocks, w = model.blocks, model.embedding.weight
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype,
                    generator=generator)
    scores = []
    for t in range(1, model.num_blocks + 1):
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype,
                            generator=generator) if stochastic else None
        one = slice(t - 1, t)
        q = blocks.head_input(features[one], z.unsqueeze(0), one)            # [1, M, Dq]
        scores.append(score(q[0].float(), blocks.head.weight[t - 1], blocks.head.bias[t - 1]))
        u_hat = softmax_embedding(q, blocks.head, w, one, blocks.ops)[0].to(z.dtype)
        z = denoise_step(z, u_hat, schedule, t, noise)
    scores.append(score(z.float(), model.classifier.weight, model.classifier.bias))
    return scores


def mixture(log_probs: torch.Tensor, readout: str, weights=None) -> torch.Tensor:
    """log of a readout's mean probability from log_probs [K, T + 1, ...] (K chains; T blocks'
    softmaxes, then the classifier): [...]. "fitted" takes the T + 1 `weights`."""
    T = log_probs.shape[1] - 1
    if readout == "fitted":  # equal weights where none were fitted yet
        weights = [1.0 / (T + 1)] * (T + 1) if weights is None else weights
        log_w = torch.as_tensor(weights, dtype=log_probs.dtype, device=log_probs.device).log()
        per_component = torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])
        return torch.logsumexp(log_w.view(-1, *[1] * (per_component.dim() - 1))
                               + per_component, 0)
    part = {"classifier": log_probs[:, T:], "last": log_probs[:, T - 1:T],
            "first": log_probs[:, :1], "blocks": log_probs[:, :T]}[readout].flatten(0, 1)
    return torch.logsumexp(part, dim=0) - math.log(part.shape[0])


@torch.no_grad()
def log_probs(model, schedule, x: torch.Tensor, readout: str, chains: int = 1,
              stochastic: bool = True, generator: torch.Generator | None = None,
              weights=None) -> torch.Tensor:
    """log p(next token) [N*L, V] at every position of x [N, L] under `readout` with `chains`
    chains (small inputs: sampling and tests; `weights`: the fitted readout's). Row n*L + i
    depends on x[n, :i+1] only."""
    features = model.blocks.features(x)

    def score(h, weight, bias):
        return F.log_softmax(F.linear(h, weight.float(), bias.float()), dim=-1)
    return mixture(torch.stack([torch.stack(chain_scores(model, schedule, features, score,
                                                         stochastic, generator))
                                for _ in range(chains)]), readout, weights)


class Scores:
    """Sums over batches of -log p(y) for every readout, with K chains and with the first chain
    alone, at each of `temperatures` [S]: `add` a batch, `means()` -> {readout: [2, S]}."""

    def __init__(self, temperatures: torch.Tensor, keep_rows: bool = False):
        """keep_rows: also keep every row's log p(y) of each component (the T blocks, the
        classifier), K chains' mean and the first chain's, at temperature 1: `rows()`."""
        self.temperatures, self.sums, self.tokens = temperatures, {}, 0
        self.kept = [] if keep_rows else None
        self.one = int((temperatures == 1).nonzero()[0]) if keep_rows else None

    @torch.no_grad()
    def add(self, model, schedule, x: torch.Tensor, y: torch.Tensor, chains: int,
            stochastic: bool, generator: torch.Generator) -> None:
        features = model.blocks.features(x)                  # [T, N*L, D], shared by the chains
        target = y.reshape(-1)
        temperatures = self.temperatures.to(target.device)

        def score(h, weight, bias):                          # [S, M]; y is read for the scores
            return -cross_entropy_rows(h, weight, bias, target, temperatures=temperatures)
        scores = torch.stack([torch.stack(chain_scores(model, schedule, features, score,
                                                       stochastic, generator))
                              for _ in range(chains)])       # [K, T + 1, S, M]
        for readout in READOUTS:
            part = -torch.stack([mixture(scores, readout).sum(-1),
                                 mixture(scores[:1], readout).sum(-1)])     # [2, S]
            self.sums[readout] = part if readout not in self.sums else self.sums[readout] + part
        if self.kept is not None:
            at_one = scores[:, :, self.one]                                  # [K, T + 1, M]
            self.kept.append(torch.stack([
                torch.logsumexp(at_one, 0) - math.log(at_one.shape[0]), at_one[0]]))
        self.tokens += target.numel()

    def rows(self) -> torch.Tensor:
        """[2, T + 1, M]: the kept log p(y) (K chains' mean, the first chain)."""
        return torch.cat(self.kept, dim=-1)

    def means(self) -> dict:
        if self.tokens == 0:
            raise ValueError("validation_loss: no validation batches")
        return {r: (s / self.tokens).cpu() for r, s in self.sums.items()}  # one host read


def fit_weights(log_probs: torch.Tensor, iterations: int = 1000) -> torch.Tensor:
    """Mixture weights [C] maximising the mean of log sum_c w_c p_c over the rows of
    log_probs [C, M] (expectation-maximisation from equal weights)."""
    log_w = torch.full((log_probs.shape[0], 1), -math.log(log_probs.shape[0]),
                       dtype=log_probs.dtype, device=log_probs.device)
    for _ in range(iterations):
        joint = log_w + log_probs
        log_w = (joint - torch.logsumexp(joint, 0)).exp().mean(1, keepdim=True).log()
    return log_w[:, 0].exp()


def fitted_readout(val_rows: torch.Tensor, heldback_rows: torch.Tensor) -> dict:
    """The "fitted" readout: the components' weights fitted on the held-back rows and the
    val loss they give, for K chains and for one chain ([2, C, M] each, `Scores.rows()`)."""
    out = {}
    for index, key in enumerate(("val_loss", "val_loss_one_chain")):
        weights = fit_weights(heldback_rows[index])
        mixed = torch.logsumexp(weights.log()[:, None] + val_rows[index], 0)
        out[key] = float(-mixed.mean())
        out["weights" if index == 0 else "weights_one_chain"] = [
            round(float(w), 4) for w in weights]
    return out


def chosen_temperatures(heldback: dict | None) -> list[int]:
    """The TEMPERATURES indices the val tokens are scored at: 1, and each readout's best on the
    held-back tokens (`Scores.means()` at TEMPERATURES), K chains and one."""
    if heldback is None:
        return [ONE]
    return sorted({ONE} | {int(i) for means in heldback.values() for i in means.argmin(dim=1)})


def readout_losses(val: dict, chosen: list[int], heldback: dict | None) -> dict:
    """{readout: {"val_loss", "val_loss_one_chain"[, "temperature", "temperature_one_chain",
    "uncalibrated", "uncalibrated_one_chain"]}} from `Scores.means()` of the val tokens at the
    `chosen` TEMPERATURES and, where calibrated, of the held-back tokens at all of them: each loss
    at the temperature that is best on the held-back tokens."""
    at = {index: k for k, index in enumerate(chosen)}
    out = {}
    for readout, means in val.items():
        one = at[ONE]
        if heldback is None:
            out[readout] = {"val_loss": float(means[0, one]),
                            "val_loss_one_chain": float(means[1, one])}
            continue
        best = [int(i) for i in heldback[readout].argmin(dim=1)]  # K chains, one chain
        out[readout] = {"val_loss": float(means[0, at[best[0]]]),
                        "val_loss_one_chain": float(means[1, at[best[1]]]),
                        "temperature": float(TEMPERATURES[best[0]]),
                        "temperature_one_chain": float(TEMPERATURES[best[1]]),
                        "uncalibrated": float(means[0, one]),
                        "uncalibrated_one_chain": float(means[1, one])}
    return out
