"""AdamW over stacked per-block parameters [T, ...], with a step count per block.

Why one optimiser over stacked parameters: docs/method.md section 2. `step(blocks)` updates only
those blocks' slices, one step count per block (shared parameters: every step):

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)       (k = that block's steps)

The step counts are device tensors. `capturable=True` also holds the lr in a 0-dim fp64 device
tensor, so a CUDA-graph replay reads it and `set_lr` needs no new capture; that update divides by
lr where the plain one multiplies, so the two agree to rounding, not bitwise.
"""
import torch

from .layers import ALL_BLOCKS, block_parameters


CPU_UPDATE_ELEMENTS = 1 << 21  # CPU: most elements of a block parameter updated at once


class BlockAdamW(torch.optim.Optimizer):
    """param_groups: those with `"per_block": True` hold block parameters (leading dim = block)."""

    def __init__(self, block_params, shared_params, num_blocks: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-3, capturable: bool = False):
        groups = [{"params": list(block_params), "per_block": True},
                  {"params": list(shared_params), "per_block": False}]
        groups = [g for g in groups if g["params"]]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.num_blocks, self.capturable = num_blocks, capturable
        self._place_lr()
        for group in self.param_groups:
            if group["per_block"]:
                for p in group["params"]:
                    if p.shape[0] != num_blocks:
                        raise ValueError(f"block parameter of shape {list(p.shape)} has no leading "
                                         f"block dimension of size {num_blocks}")

    def _place_lr(self) -> None:
        """Each group's lr as this optimiser holds it: a device tensor (capturable) or a float."""
        for group in self.param_groups:
            lr = group["lr"]
            if self.capturable:
                group["lr"] = torch.as_tensor(lr, dtype=torch.float64,
                                              device=group["params"][0].device).clone()
            elif isinstance(lr, torch.Tensor):
                group["lr"] = float(lr.item())  # a capturable checkpoint loaded into a plain one

    def set_lr(self, lr: float) -> None:
        """Change the learning rate; capturable: in place, so a captured graph sees the new one."""
        for group in self.param_groups:
            if self.capturable:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, then the lr in this optimiser's form and the step counts on the parameters'
        device (a checkpoint is loaded onto the CPU; a count left there would not broadcast)."""
        super().load_state_dict(state_dict)
        self._place_lr()
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

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
            per_block = group["per_block"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p, per_block)
                param, grad = p, p.grad
                exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
                if per_block:
                    param, grad = param[blocks], grad[blocks]
                    exp_avg, exp_avg_sq, step = exp_avg[blocks], exp_avg_sq[blocks], step[blocks]
                if per_block and param.device.type == "cpu" and param.numel() > CPU_UPDATE_ELEMENTS:
                    # a few blocks at a time: the update's temporary stays small enough for the
                    # allocator to reuse (a parameter-sized one is mapped and zeroed anew each step)
                    per = max(1, CPU_UPDATE_ELEMENTS // param[0].numel())
                    for i in range(0, param.shape[0], per):
                        part = slice(i, i + per)
                        self._update(param[part], grad[part], exp_avg[part], exp_avg_sq[part],
                                     step[part], group, per_block)
                else:
                    self._update(param, grad, exp_avg, exp_avg_sq, step, group, per_block)
        return loss

    def _update(self, param, grad, exp_avg, exp_avg_sq, step, group: dict, per_block: bool) -> None:
        """One AdamW update, in place; per_block: leading dim = block, `step` one count per block."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step.add_(1)  # a view of the state's counts: updates them in place
        # per-block bias corrections, shaped to broadcast over each block's slice
        shape = (-1,) + (1,) * (param.dim() - 1) if per_block else ()
        k = step.to(param.dtype)  # bias corrections in the parameter's precision
        bias_correction1 = (1 - beta1 ** k).view(shape)
        bias_correction2_sqrt = (1 - beta2 ** k).sqrt().view(shape)
        param.mul_(1 - lr * wd)  # capturable: a 0-dim device tensor, no host read
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # one temporary of the update's size: bias_correction1 * (sqrt(v) / bc2 + eps)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps).mul_(bias_correction1)
        if self.capturable:  # addcdiv_'s value is a Python number: divide by lr instead
            param.addcdiv_(exp_avg, denom.div_(lr), value=-1.0)
        else:
            param.addcdiv_(exp_avg, denom, value=-lr)


def make_optimizer(model, cfg, capturable: bool = False) -> BlockAdamW:
    """AdamW as in the paper (lr 1e-3, weight decay 1e-3) over the model's block and shared
    parameters; `capturable`: the lr on the device, for a step captured in a CUDA graph."""
    block = [p for p in block_parameters(model) if p.requires_grad]
    ids = {id(p) for p in block_parameters(model)}
    shared = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]  # not frozen
    return BlockAdamW(block, shared, model.num_blocks, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      capturable=capturable)


def set_hyperparameters(optimizer: BlockAdamW, cfg) -> None:
    """On resume: the config's lr and weight decay into every param group (the optimiser's state
    dict brings the checkpoint's back), so that a changed `--lr` or `--weight-decay` is applied."""
    optimizer.set_lr(cfg.lr)
    for group in optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay
