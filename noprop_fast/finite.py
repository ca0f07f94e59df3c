"""Non-finite values: the loss at its usual host reads, the whole training state before a
checkpoint (docs/usage.md, "A run's folder"). The state can go non-finite while the loss looks
finite (BatchNorm running variances overflow, say), so `check_state` checks every tensor of it."""
import math

import torch

from .errors import UserError
from .ops import check_labels


class NonFiniteLoss(UserError):
    """The loss turned NaN or infinite; the run stops and keeps its last good checkpoint."""


class NonFiniteState(UserError):
    """A parameter, buffer or optimiser-state tensor holds NaN or inf; no checkpoint is written."""


def check_losses(values: list[float], first_step: int, where: str, last_good: str) -> None:
    """values: host floats of steps first_step + 1, ...; `where` completes "at step N".."""
    for i, value in enumerate(values):
        if not math.isfinite(value):
            check_labels()  # a label outside the classes makes the loss NaN: say that instead
            raise NonFiniteLoss(f"loss became {value} at step {first_step + i + 1}{where}; run "
                                f"stopped. Last good checkpoint: {last_good}")


def nonfinite_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimiser-state tensors that hold NaN or inf; one host
    sync."""
    names = {id(p): n for n, p in model.named_parameters()}
    named = [*model.named_parameters(), *model.named_buffers()]
    named += [(f"optimiser {key} of {names.get(id(p), '?')}", value)
              for p, state in optimizer.state.items() for key, value in state.items()
              if isinstance(value, torch.Tensor)]
    named = [(n, t) for n, t in named if t.is_floating_point()]
    if not named:
        return []
    device = named[0][1].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])  # [tensors] bool
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def check_state(model, optimizer, when: str, last_good: str) -> None:
    """Raise NonFiniteState naming the first tensors that are not finite (`when`: "after epoch 3")."""
    bad = nonfinite_names(model, optimizer)
    if bad:
        raise NonFiniteState(f"non-finite values in {_listed(bad)} {when}; run stopped, no "
                             f"checkpoint written for it. Last good checkpoint: {last_good}")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_restored_state(model, optimizer, path) -> None:
    """A checkpoint to resume from must be finite (one written before these checks may not be)."""
    bad = nonfinite_names(model, optimizer)
    if bad:
        raise NonFiniteState(f"{path}: holds non-finite values ({_listed(bad)}); it cannot be "
                             "resumed")
