"""`Task`, what loop.Run asks of a task, and the update every training step ends with."""
import torch

from .. import runs
from ..layers import ALL_BLOCKS
from ..memory import cuda_peak, memory_kind
from ..nvtx_ranges import phase
from ..optim import BlockAdamW


def apply_gradients(loss: torch.Tensor, optimizer: BlockAdamW, blocks: slice = ALL_BLOCKS,
                    scaler=None, reduce=None) -> torch.Tensor:
    """Backward and one optimiser step on `blocks` (fp16: through the loss scaler; `reduce`: the
    gradients' all-reduce of several processes). Returns the detached loss."""
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if reduce is not None:
            reduce()
    with phase("optimizer"):
        if scaler is None:
            optimizer.step(blocks)
        else:
            scaler.step(optimizer, blocks)  # skipped (one host sync) if a gradient overflowed
            scaler.update()
    return loss.detach()


class Task:
    """A task names its `unit` ("epoch" or "step", also its `Progress`'s counter; Progress: what
    a checkpoint carries besides the weights) and supplies load_data, build_model, loss, round,
    step_label, bar, end_round, evaluate, eval_fields, round_line, summary_fields, header and
    closing; the defaults below keep no random streams and draw no samples."""
    keeps_streams = measures_saved = keeps_block_losses = False
    steps_per_unit = 1  # steps per epoch or step

    def __init__(self, cfg, data, device: torch.device, length: int):
        self.cfg, self.data, self.device, self.length = cfg, data, device, length

    @staticmethod
    def sampler(cfg, data):
        return None

    def prepare(self, model, pretrain: bool, show_progress: bool) -> None:
        pass

    def postfix(self, p, rate: float) -> dict:
        return {}

    def summary(self, run) -> dict:
        cfg, p, device = self.cfg, run.progress, run.device
        cuda = device.type == "cuda"
        return {"task": cfg.task, "method": cfg.method, **self.summary_fields(run),
                "inference": cfg.inference, "ops": run.ops.name, "precision": cfg.precision,
                "train_seconds": p.train_seconds,
                # on CUDA the allocator's peak; on a CPU the image task's saved activations
                "peak_memory_bytes": cuda_peak(device) if cuda else
                p.saved_bytes if self.measures_saved else None,
                "memory_kind": memory_kind(device) if cuda or self.measures_saved else None,
                "checkpoint_bytes": runs.checkpoint_bytes(run.run_dir),
                "device": runs.device_name(device), "data_source": self.data.source,
                "run_dir": str(run.run_dir)}

    def notes(self, run, summary: dict) -> list[str]:
        return []

    def sample_lines(self, run, tokenizer) -> list[str]:
        return []
