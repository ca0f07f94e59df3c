"""AdamW over stacked per-block parameters, with a step count per block.

AdamW is elementwise, so one AdamW over parameters stacked [T, ...] is exactly T independent
AdamWs while every block is updated on every step (a test compares it with torch.optim.AdamW).
That stops being true when only some blocks train, as in the paper's sequential schedule (block 1
for a pass over the data, then block 2, ...): a plain AdamW would keep moving the idle blocks'
slices with their momentum and weight decay, and would count their steps for bias correction.
`BlockAdamW.step(blocks)` updates only the given blocks' slices of the block parameters and keeps
one step count per block; shared parameters (class embedding, classifier) update on every step.

The update (decoupled weight decay, as torch.optim.AdamW):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)       (k = that block's steps)

The step counts are device tensors and nothing reads their values on the host; the learning rate
is a constant float (the paper uses no schedule), so a step can be captured in a CUDA graph.
"""
import torch

from .layers import ALL_BLOCKS, block_parameters


class BlockAdamW(torch.optim.Optimizer):
    """param_groups: those with `"per_block": True` hold block parameters (leading dim = block)."""

    def __init__(self, block_params, shared_params, num_blocks: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-3):
        groups = [{"params": list(block_params), "per_block": True},
                  {"params": list(shared_params), "per_block": False}]
        groups = [g for g in groups if g["params"]]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.num_blocks = num_blocks
        for group in self.param_groups:
            if group["per_block"]:
                for p in group["params"]:
                    if p.shape[0] != num_blocks:
                        raise ValueError(f"block parameter of shape {list(p.shape)} has no leading "
                                         f"block dimension of size {num_blocks}")

    def _state(self, p: torch.Tensor, per_block: bool) -> dict:
        state = self.state[p]
        if not state:
            steps = (self.num_blocks,) if per_block else ()
            state["step"] = torch.zeros(steps, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, blocks: slice = ALL_BLOCKS, closure=None):
        """Update the shared parameters and the block parameters of `blocks` (default: all)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd, per_block = group["eps"], group["weight_decay"], group["per_block"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p, per_block)
                param, grad = p, p.grad
                exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                if per_block:
                    param, grad = param[blocks], grad[blocks]
                    exp_avg, exp_avg_sq, step = exp_avg[blocks], exp_avg_sq[blocks], step[blocks]
                step.add_(1)  # a view of the state's counts: updates them in place
                # per-block bias corrections, shaped to broadcast over each block's slice
                shape = (-1,) + (1,) * (param.dim() - 1) if per_block else ()
                k = step.to(param.dtype)  # bias corrections in the parameter's precision
                bias_correction1 = (1 - beta1 ** k).view(shape)
                bias_correction2_sqrt = (1 - beta2 ** k).sqrt().view(shape)
                param.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # one temporary of the parameter's size: bias_correction1 * (sqrt(v) / bc2 + eps)
                denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps).mul_(bias_correction1)
                param.addcdiv_(exp_avg, denom, value=-lr)
        return loss


def make_optimizer(model, cfg) -> BlockAdamW:
    """AdamW as in the paper (lr 1e-3, weight decay 1e-3) over the model's block and shared parameters."""
    block = [p for p in block_parameters(model) if p.requires_grad]
    ids = {id(p) for p in block_parameters(model)}
    shared = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]  # not frozen
    return BlockAdamW(block, shared, model.num_blocks, lr=cfg.lr, weight_decay=cfg.weight_decay)
