"""The image task: a round is an epoch, one pass over the data per block slice (the sequential
schedule: one slice per block; docs/method.md section 2). The weights are drawn from `seed`;
every epoch reseeds the global generator (noise, dropout), the shuffling generator and the fused
path's Philox stream from (seed, epoch), so a run resumed after epoch k replays epochs k+1..
exactly as the uninterrupted run does (a test checks).
"""
from dataclasses import dataclass, field

import torch

from .. import continuous
from ..data import ImageData, batches, load_image_dataset
from ..layers import ALL_BLOCKS
from ..noprop import backprop_loss, noprop_loss, predict_classes
from ..models.image import ClassEmbedding, ImageModel, prototype_embeddings
from ..optim import BlockAdamW
from ..schedule import NoiseSchedule
from .base import Task, apply_gradients


def build_model(cfg, data: ImageData, device: torch.device) -> ImageModel:
    torch.manual_seed(cfg.seed)
    prototypes = None
    if cfg.embedding == "prototype":
        prototypes = prototype_embeddings(data.train_x, data.train_y, data.num_classes)
    embedding = ClassEmbedding(cfg.embedding, data.num_classes, cfg.embed_dim, prototypes)
    model = ImageModel(cfg.method, cfg.num_blocks, data.image_shape, data.num_classes, embedding,
                       cfg.dropout, cfg.classifier_init, cfg.ct_snr_min, cfg.ct_snr_max,
                       cfg.eta)
    return model.to(device)


def train_step(model: ImageModel, optimizer: BlockAdamW, schedule: NoiseSchedule,
               x: torch.Tensor, y: torch.Tensor, blocks: slice = ALL_BLOCKS, noise=None,
               scaler=None):
    """One image step on one process: (loss, parts) as device tensors (noise: a PhiloxNoise)."""
    loss, parts = ImageTask.loss(model, schedule, x, y, blocks, noise)
    return apply_gradients(loss, optimizer, blocks, scaler), parts


def inference_used(cfg) -> str:
    """How a test accuracy was read: the chain or ODE, its steps, the readout."""
    if cfg.method == "noprop-ct":
        return f"{cfg.inference} Eq. 3 chain, {cfg.inference_steps} steps, classifier on z_1"
    if cfg.method == "noprop-fm":
        readout = "nearest class embedding" if cfg.fm_readout == "nearest" else "classifier"
        return f"{cfg.ode_solver} ODE, {cfg.inference_steps} steps, {readout}"
    return f"{cfg.inference} inference"


@dataclass
class ImageProgress:
    """What a checkpoint carries besides the model and the optimiser."""
    epoch: int = 0                   # last finished epoch
    train_seconds: float = 0.0       # training time so far, evaluation excluded
    saved_bytes: int = 0             # CPU: largest activation bytes saved for backward in a step
    history: list = field(default_factory=list)


class ImageTask(Task):
    unit, none_yet, state_when, Progress = "epoch", "none (no epoch finished)", "after epoch", \
        ImageProgress
    measures_saved = True   # CPU: the activation bytes of each epoch's first step

    @staticmethod
    def loss(model, schedule: NoiseSchedule, x, y, blocks: slice = ALL_BLOCKS, noise=None,
             shared_terms: bool = True):
        if model.method == "noprop":
            return noprop_loss(model, schedule, x, y, blocks, noise, shared_terms)
        if model.method == "noprop-ct":  # one network: no blocks, its own learned schedule
            return continuous.ct_loss(model, x, y, noise)
        if model.method == "noprop-fm":
            return continuous.fm_loss(model, x, y, noise)
        return backprop_loss(model, x, y)

    def __init__(self, cfg, data: ImageData, device: torch.device, data_share=(0, 1)):
        super().__init__(cfg, data.to(device), device, cfg.epochs)
        self.keeps_block_losses = cfg.method == "noprop"

    @staticmethod
    def load_data(cfg, show_progress: bool) -> ImageData:
        return load_image_dataset(cfg.dataset, cfg.data_dir)

    def build_model(self, cfg) -> ImageModel:
        return build_model(cfg, self.data, self.device)

    def passes(self) -> list[slice]:
        """The block slices trained in one epoch, each for one pass over the data."""
        if self.cfg.method == "noprop" and self.cfg.block_schedule == "sequential":
            return [slice(t, t + 1) for t in range(self.cfg.num_blocks)]
        return [ALL_BLOCKS]

    @property
    def per_pass(self) -> int:
        return -(-self.data.train_x.shape[0] // self.cfg.batch_size)

    @property
    def steps_per_unit(self) -> int:
        return self.per_pass * len(self.passes())

    def round(self, p: ImageProgress, noise):
        """(steps at most, the (x, y, blocks) of epoch p.epoch + 1), its streams reseeded."""
        cfg, seed = self.cfg, self.cfg.seed * 1_000_003 + p.epoch + 1  # (seed, epoch)
        torch.manual_seed(seed)
        shuffle = torch.Generator(device=self.device).manual_seed(seed)
        if noise is not None:
            noise.reseed(seed)  # in place: a captured step holds its tensors' addresses

        def steps():
            for blocks in self.passes():
                for x, y in batches(self.data.train_x, self.data.train_y, cfg.batch_size,
                                    generator=shuffle):
                    if x.shape[0] >= 2:  # BatchNorm needs two examples: a last one is skipped
                        yield x, y, blocks
        return self.steps_per_unit, steps()

    def step_label(self, p: ImageProgress) -> tuple[int, str]:
        return 0, f" of epoch {p.epoch + 1}"

    def bar(self, p: ImageProgress, total: int) -> dict:
        return {"total": total, "desc": f"epoch {p.epoch + 1}/{self.cfg.epochs}"}

    def postfix(self, p: ImageProgress, rate: float) -> dict:
        accs = [r["test_accuracy"] for r in p.history if r.get("test_accuracy") is not None]
        return {"img_s": f"{rate:.0f}", "acc": f"{accs[-1]:.4f}" if accs else "-"}

    def end_round(self, p: ImageProgress, losses: list, seconds: float, seen: int, block_sum):
        p.epoch += 1
        p.train_seconds += seconds
        record = {"epoch": p.epoch, "train_loss": sum(losses) / max(len(losses), 1),
                  "epoch_seconds": seconds, "images_per_second": seen / seconds}
        if block_sum is not None:
            record["block_losses"] = (block_sum / self.per_pass).tolist()
        record["test_accuracy"] = None
        return record

    def evaluate(self, model, schedule: NoiseSchedule, transport=None) -> float:
        """Test accuracy: predictions from the images alone, compared with the labels after."""
        cfg, stochastic = self.cfg, self.cfg.inference == "stochastic"
        if model.continuous:  # the whole test set in one chain; CUDA: one step, captured
            graphs = cfg.cuda_graphs != "off" and cfg.precision != "fp16"
            predicted = continuous.predict_classes(
                model, self.data.test_x, cfg.inference_steps, stochastic, cfg.ode_solver,
                cfg.fm_readout, cfg.seed, graphs)
        else:
            predicted = predict_classes(model, schedule, self.data.test_x, stochastic, cfg.seed,
                                        transport=transport)
        return (predicted == self.data.test_y).float().mean().item()  # host sync

    def eval_fields(self, accuracy: float) -> dict:
        return {"test_accuracy": accuracy}

    def round_line(self, r: dict) -> str:
        acc = r["test_accuracy"]
        return (f"epoch {r['epoch']}/{self.cfg.epochs}  loss {r['train_loss']:.4f}  "
                f"test acc {'-' if acc is None else f'{acc:.4f}'}  "
                f"{r['epoch_seconds']:.1f}s  {r['images_per_second']:.0f} img/s")

    def summary_fields(self, run) -> dict:
        cfg, p = self.cfg, run.progress
        # the last epoch of a run is always evaluated, so this is the final model's accuracy
        accs = [r["test_accuracy"] for r in p.history if r.get("test_accuracy") is not None]
        fields = {"dataset": cfg.dataset, "embedding": cfg.embedding,
                  "num_blocks": 1 if run.model.continuous else cfg.num_blocks,
                  "block_schedule": cfg.block_schedule if cfg.method == "noprop" else None,
                  "epochs": p.epoch, "test_accuracy": accs[-1] if accs else None,
                  "seconds_per_epoch": p.train_seconds / max(p.epoch, 1)}
        if run.model.continuous:  # how the figure was read, and what the chain or ODE cost
            timed = [r["eval_seconds"] for r in p.history if r.get("eval_seconds") is not None]
            fields.update(inference_steps=cfg.inference_steps,
                          readout="classifier" if cfg.method == "noprop-ct" else cfg.fm_readout,
                          eval_seconds_per_1000=(timed[-1] * 1000 / self.data.test_x.shape[0]
                                                 if timed else None))
            if cfg.method == "noprop-fm":
                fields["ode_solver"] = cfg.ode_solver
        return fields

    def header(self, run) -> str:
        cfg = self.cfg
        shape = (f"one network with t as an input (--num-blocks not used), {cfg.inference_steps} "
                 "inference steps" if run.model.continuous else f"T={cfg.num_blocks}")
        return (f"{cfg.method} on {cfg.dataset} ({self.data.source}), {shape}, {cfg.embedding} "
                "embedding")

    def closing(self, run, s: dict) -> list[str]:
        """The closing table (one row per epoch) and the result."""
        from ..reports import results_table
        acc = s["test_accuracy"]
        return [results_table(run.progress.history),
                f"test accuracy {'-' if acc is None else f'{acc:.4f}'} ({inference_used(self.cfg)}"
                f"), train {s['train_seconds']:.1f}s, memory "
                f"{s['peak_memory_bytes'] / 2**20:.1f} MiB ({s['memory_kind']}); summary in "
                f"{run.run_dir / 'summary.json'}"]
