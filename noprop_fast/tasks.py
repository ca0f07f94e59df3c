"""What differs between the two tasks a run trains (loop.py runs both): the model, the batches of
a round, the loss of a batch, the evaluation, the summary's fields and the printed lines.

Image (`ImageTask`): a round is an epoch, one pass over the data per block slice (the sequential
schedule: one slice per block). The weights are drawn from `seed`; every epoch reseeds the global
generator (noise, dropout), the shuffling generator and the fused path's Philox stream from
(seed, epoch), so a run resumed after epoch k replays epochs k+1.. as the uninterrupted run does.

Language (`LanguageTask`): a run is counted in optimiser steps (a token budget, not epochs); a
round is `eval_every` steps (or what is left), ending in the validation loss on the first
`eval_tokens` tokens of the val split (the same tokens every time, so the curve compares like
with like). The batch stream, the global generator and the Philox offset are in the checkpoint
(`keeps_streams`), so a resumed run replays its steps exactly too.
"""
import math
from dataclasses import dataclass, field

import torch

from . import runs
from .data import ImageData, batches, load_image_dataset
from .data.shards import TokenBatches, TokenData, unigram_entropy, val_batches
from .errors import UserError
from .language import lm_loss, sample, validation_loss
from .layers import ALL_BLOCKS
from .memory import cuda_peak, memory_kind
from .methods import backprop_loss, noprop_loss, predict_classes
from .models.image import ClassEmbedding, ImageModel, prototype_embeddings
from .models.lm import GPT, LanguageModel
from .nvtx_ranges import phase
from .optim import BlockAdamW
from .progress import RunClock, evaluations_between
from .schedule import NoiseSchedule


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


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- images --------------------------------------------------------------------------------------
def build_model(cfg, data: ImageData, device: torch.device) -> ImageModel:
    torch.manual_seed(cfg.seed)
    prototypes = None
    if cfg.embedding == "prototype":
        prototypes = prototype_embeddings(data.train_x, data.train_y, data.num_classes)
    embedding = ClassEmbedding(cfg.embedding, data.num_classes, cfg.embed_dim, prototypes)
    model = ImageModel(cfg.method, cfg.num_blocks, data.image_shape, data.num_classes, embedding,
                       cfg.dropout, cfg.classifier_init)
    return model.to(device)


def image_loss(model, schedule: NoiseSchedule, x, y, blocks: slice = ALL_BLOCKS, noise=None,
               shared_terms: bool = True):
    if model.method == "noprop":
        return noprop_loss(model, schedule, x, y, blocks, noise, shared_terms)
    return backprop_loss(model, x, y)


def train_step(model: ImageModel, optimizer: BlockAdamW, schedule: NoiseSchedule,
               x: torch.Tensor, y: torch.Tensor, blocks: slice = ALL_BLOCKS, noise=None,
               scaler=None):
    """One image step on one process: (loss, parts) as device tensors (noise: a PhiloxNoise)."""
    loss, parts = image_loss(model, schedule, x, y, blocks, noise)
    return apply_gradients(loss, optimizer, blocks, scaler), parts


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@dataclass
class ImageProgress:
    """What a checkpoint carries besides the model and the optimiser."""
    epoch: int = 0                   # last finished epoch
    train_seconds: float = 0.0       # training time so far, evaluation excluded
    saved_bytes: int = 0             # CPU: largest activation bytes saved for backward in a step
    history: list = field(default_factory=list)


class ImageTask:
    unit, none_yet, Progress = "epoch", "none (no epoch finished)", ImageProgress
    keeps_streams = False   # every epoch reseeds its streams from (seed, epoch)
    measures_saved = True   # CPU: the activation bytes of each epoch's first step
    loss = staticmethod(image_loss)

    def __init__(self, cfg, data: ImageData, device: torch.device, data_share=(0, 1)):
        self.cfg, self.device, self.data = cfg, device, data.to(device)
        self.length = cfg.epochs
        self.keeps_block_losses = cfg.method == "noprop"

    @staticmethod
    def load_data(cfg, show_progress: bool) -> ImageData:
        return load_image_dataset(cfg.dataset, cfg.data_dir)

    @staticmethod
    def sampler(cfg, data):
        return None

    def build_model(self, cfg) -> ImageModel:
        return build_model(cfg, self.data, self.device)

    def prepare(self, model, pretrain: bool, show_progress: bool) -> None:
        pass

    def position(self, p: ImageProgress) -> int:
        return p.epoch

    def passes(self) -> list[slice]:
        """The block slices trained in one epoch, each for one pass over the data."""
        if self.cfg.method == "noprop" and self.cfg.block_schedule == "sequential":
            return [slice(t, t + 1) for t in range(self.cfg.num_blocks)]
        return [ALL_BLOCKS]

    def per_pass(self) -> int:
        return -(-self.data.train_x.shape[0] // self.cfg.batch_size)

    def round(self, p: ImageProgress, noise):
        """(steps at most, the (x, y, blocks) of epoch p.epoch + 1), its streams reseeded."""
        cfg, seed = self.cfg, epoch_seed(self.cfg.seed, p.epoch + 1)
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
        return self.per_pass() * len(self.passes()), steps()

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
            record["block_losses"] = (block_sum / self.per_pass()).tolist()
        record["test_accuracy"] = None
        return record

    def state_when(self, p: ImageProgress) -> str:
        return f"after epoch {p.epoch}"

    def evaluation_due(self, p: ImageProgress) -> bool:
        return p.epoch % self.cfg.eval_every == 0 or p.epoch == self.cfg.epochs

    def evaluate(self, model, schedule: NoiseSchedule, transport=None) -> float:
        """Test accuracy: predictions from the images alone, compared with the labels after."""
        predicted = predict_classes(model, schedule, self.data.test_x,
                                    self.cfg.inference == "stochastic", self.cfg.seed,
                                    transport=transport)
        return (predicted == self.data.test_y).float().mean().item()  # host sync

    def eval_fields(self, accuracy: float) -> dict:
        return {"test_accuracy": accuracy}

    def round_line(self, r: dict) -> str:
        acc = r["test_accuracy"]
        return (f"epoch {r['epoch']}/{self.cfg.epochs}  loss {r['train_loss']:.4f}  "
                f"test acc {'-' if acc is None else f'{acc:.4f}'}  "
                f"{r['epoch_seconds']:.1f}s  {r['images_per_second']:.0f} img/s")

    def clock(self, p: ImageProgress) -> RunClock:
        """The time estimate of the epochs left (progress.py): steps and evaluations to come."""
        cfg = self.cfg
        return RunClock((cfg.epochs - p.epoch) * self.per_pass() * len(self.passes()),
                        evaluations_between(p.epoch, cfg.epochs, cfg.eval_every))

    def summary(self, run) -> dict:
        cfg, p, device = self.cfg, run.progress, run.device
        # the last epoch of a run is always evaluated, so this is the final model's accuracy
        accs = [r["test_accuracy"] for r in p.history if r.get("test_accuracy") is not None]
        return {
            "task": cfg.task, "method": cfg.method, "dataset": cfg.dataset,
            "embedding": cfg.embedding, "num_blocks": cfg.num_blocks,
            "block_schedule": cfg.block_schedule if cfg.method == "noprop" else None,
            "inference": cfg.inference, "epochs": p.epoch, "ops": run.ops_name,
            "precision": cfg.precision, "test_accuracy": accs[-1] if accs else None,
            "train_seconds": p.train_seconds,
            "seconds_per_epoch": p.train_seconds / max(p.epoch, 1),
            "peak_memory_bytes": cuda_peak(device) if device.type == "cuda" else p.saved_bytes,
            "memory_kind": memory_kind(device),
            "checkpoint_bytes": runs.checkpoint_bytes(run.run_dir),
            "device": runs.device_name(device), "data_source": self.data.source,
            "run_dir": str(run.run_dir),
        }

    def header(self, run) -> str:
        cfg = self.cfg
        return (f"{cfg.method} on {cfg.dataset} ({self.data.source}), T={cfg.num_blocks}, "
                f"{cfg.embedding} embedding")

    def closing(self, run, s: dict) -> list[str]:
        """The closing table (one row per epoch) and the result."""
        lines = ["epoch  train loss  test acc  seconds  img/s",
                 "-----  ----------  --------  -------  -----"]
        for r in run.progress.history:
            acc = "-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.4f}"
            lines.append(f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {acc:>8}  "
                         f"{r['epoch_seconds']:>7.2f}  {r['images_per_second']:>5.0f}")
        acc = s["test_accuracy"]
        return lines + [
            f"test accuracy {'-' if acc is None else f'{acc:.4f}'} ({self.cfg.inference} "
            f"inference), train {s['train_seconds']:.1f}s, memory "
            f"{s['peak_memory_bytes'] / 2**20:.1f} MiB ({s['memory_kind']}); summary in "
            f"{run.run_dir / 'summary.json'}"]

    def notes(self, run, summary: dict) -> list[str]:
        return []

    def sample_lines(self, run, tokenizer) -> list[str]:
        return []


# -- language ------------------------------------------------------------------------------------
def build_lm(cfg, vocab_size: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    if cfg.method == "backprop":
        model = GPT(cfg.num_blocks * cfg.layers_per_block, vocab_size, cfg.seq_len, cfg.width,
                    cfg.heads)
    else:
        model = LanguageModel(cfg.num_blocks, vocab_size, cfg.seq_len, cfg.width, cfg.heads,
                              cfg.layers_per_block, cfg.embed_dim,
                              "onehot" if cfg.embed_init == "onehot" else "learned")
    return model.to(device)


def load_token_data(data_dir: str | None, show_progress: bool = True) -> TokenData:
    """The shards of `data_dir`, or the embedded corpus (built and cached on first use)."""
    if data_dir is None:
        from .data.corpus import embedded_corpus_dir
        data_dir = embedded_corpus_dir(progress=show_progress)
    return TokenData.load(data_dir)


@dataclass
class LMProgress:
    """What a checkpoint carries besides the model, the optimiser and the random streams."""
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


class LanguageTask:
    unit, none_yet, Progress = "step", "none (no evaluation reached)", LMProgress
    keeps_streams, measures_saved, keeps_block_losses = True, False, False
    loss = staticmethod(lm_loss)

    def __init__(self, cfg, data: TokenData, device: torch.device, data_share=(0, 1)):
        """data_share: (this process's data index, data processes): its windows of each batch."""
        if cfg.method == "backprop" and cfg.embed_init != "learned":
            raise UserError("embed_init: the GPT baseline learns its own embeddings; use learned")
        self.cfg, self.data, self.device, self.length = cfg, data, device, cfg.max_steps
        index, count = data_share
        self.batches = TokenBatches(data.train, cfg.batch_size // count, cfg.seq_len, device,
                                    seed=cfg.seed, rank=index, world_size=count)

    @staticmethod
    def load_data(cfg, show_progress: bool) -> TokenData:
        from .preflight import check_token_data
        data = load_token_data(cfg.data_dir, show_progress)
        check_token_data(cfg, data)
        return data

    @staticmethod
    def sampler(cfg, data):
        from .preflight import sampling_tokenizer
        return sampling_tokenizer(cfg, data)

    def build_model(self, cfg):
        return build_lm(cfg, self.data.vocab_size, self.device)

    def prepare(self, model, pretrain: bool, show_progress: bool) -> None:
        """embed_init mlm: the masked-LM phase (`pretrain`: not when a checkpoint follows), then
        the embeddings frozen (the targets stay put)."""
        cfg = self.cfg
        if cfg.embed_init == "mlm":
            if pretrain:
                from .mlm import pretrain_embeddings
                stream = TokenBatches(self.data.train, cfg.batch_size, cfg.seq_len, self.device,
                                      seed=cfg.seed + 2)
                weight = pretrain_embeddings(stream, self.data.vocab_size, cfg.embed_dim,
                                             cfg.seq_len, cfg.mlm_steps, self.device,
                                             seed=cfg.seed, show_progress=show_progress)
                with torch.no_grad():
                    model.embedding.weight.copy_(weight)
                model.matched_filter_classifier()
            model.embedding.weight.requires_grad_(False)
        torch.manual_seed(cfg.seed + 1)  # the reference path's training noise

    def position(self, p: LMProgress) -> int:
        return p.step

    def round(self, p: LMProgress, noise):
        """(steps, their (x, y, blocks)): up to the next evaluation."""
        cfg = self.cfg
        steps = min(cfg.eval_every - p.step % cfg.eval_every, cfg.max_steps - p.step)
        return steps, ((*self.batches.next(), ALL_BLOCKS) for _ in range(steps))

    def step_label(self, p: LMProgress) -> tuple[int, str]:
        return p.step, ""

    def bar(self, p: LMProgress, total: int) -> dict:
        return {"total": self.cfg.max_steps, "initial": p.step, "desc": "train"}

    def postfix(self, p: LMProgress, rate: float) -> dict:
        return {}

    def end_round(self, p: LMProgress, losses: list, seconds: float, seen: int, block_sum):
        tokens = len(losses) * self.cfg.batch_size * self.cfg.seq_len
        p.step, p.tokens_seen = p.step + len(losses), p.tokens_seen + tokens
        p.train_seconds += seconds
        return {"step": p.step, "tokens_seen": p.tokens_seen,
                "train_loss": sum(losses) / max(len(losses), 1),
                "tokens_per_second": tokens / max(seconds, 1e-9)}

    def state_when(self, p: LMProgress) -> str:
        return f"at step {p.step}"

    def evaluation_due(self, p: LMProgress) -> bool:
        return True

    def val_batches(self):
        cfg = self.cfg
        return val_batches(self.data.val, cfg.batch_size, cfg.seq_len, self.device,
                           max_tokens=cfg.eval_tokens)

    def evaluate(self, model, schedule: NoiseSchedule, transport=None) -> dict:
        cfg = self.cfg
        return validation_loss(model, schedule, self.val_batches(),
                               stochastic=cfg.inference == "stochastic", seed=cfg.seed,
                               chains=cfg.eval_chains, transport=transport)

    def eval_fields(self, val: dict) -> dict:
        return {**val, "val_perplexity": math.exp(min(val["val_loss"], 50.0))}

    def round_line(self, r: dict) -> str:
        return (f"step {r['step']}/{self.cfg.max_steps}  train loss {r['train_loss']:.4f}  "
                f"val loss {r['val_loss']:.4f} (ppl {r['val_perplexity']:.2f})  "
                f"{r['tokens_per_second']:.0f} tok/s")

    def clock(self, p: LMProgress) -> RunClock:
        cfg = self.cfg
        return RunClock(cfg.max_steps - p.step,
                        evaluations_between(p.step, cfg.max_steps, cfg.eval_every))

    def unigram_entropy(self) -> float:
        """Entropy of the evaluated val tokens' own unigram distribution: the loss of a model that
        knew the exact token frequencies of these tokens and nothing else."""
        targets = torch.cat([y.reshape(-1).cpu() for _, y in self.val_batches()])
        return unigram_entropy(targets.numpy(), self.data.vocab_size)

    def summary(self, run) -> dict:
        cfg, p, device, data = self.cfg, run.progress, run.device, self.data
        last = p.history[-1] if p.history else {}
        cuda = device.type == "cuda"
        return {
            "task": cfg.task, "method": cfg.method, "data_source": data.source,
            "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
            "num_blocks": cfg.num_blocks, "layers_per_block": cfg.layers_per_block,
            "width": cfg.width, "embed_init": cfg.embed_init if cfg.method == "noprop" else None,
            "parameters": run.parameters, "inference": cfg.inference,
            "steps": p.step, "tokens_seen": p.tokens_seen,
            "val_loss": last.get("val_loss"), "val_perplexity": last.get("val_perplexity"),
            "val_loss_one_chain": last.get("val_loss_one_chain"),
            "eval_chains": cfg.eval_chains if cfg.method == "noprop" else None,
            "val_tokens": last.get("val_tokens"), "unigram_entropy": self.unigram_entropy(),
            "train_seconds": p.train_seconds,
            "tokens_per_second": p.tokens_seen / p.train_seconds if p.train_seconds else None,
            "ops": run.ops_name, "precision": cfg.precision,
            # the CUDA allocator's peak; a CPU run has no such figure (null)
            "peak_memory_bytes": cuda_peak(device) if cuda else None,
            "memory_kind": memory_kind(device) if cuda else None,
            "device": runs.device_name(device), "run_dir": str(run.run_dir),
            "checkpoint_bytes": runs.checkpoint_bytes(run.run_dir),
        }

    def header(self, run) -> str:
        cfg = self.cfg
        shape = (f"T={cfg.num_blocks} blocks of {cfg.layers_per_block} layer(s)"
                 if cfg.method == "noprop" else f"{cfg.num_blocks * cfg.layers_per_block} layers")
        return (f"{cfg.method} LM on {self.data.source}, {shape}, width {cfg.width}, "
                f"{run.parameters / 1e6:.2f}M parameters")

    def closing(self, run, s: dict) -> list[str]:
        cfg = self.cfg
        chains = (f", {cfg.eval_chains} chains, {cfg.inference} inference; one chain "
                  f"{s['val_loss_one_chain']:.4f}" if cfg.method == "noprop" else "")
        return [f"val loss {s['val_loss']:.4f} nats/token (perplexity {s['val_perplexity']:.2f}"
                f"{chains}) on {s['val_tokens']:,} val tokens, whose unigram entropy is "
                f"{s['unigram_entropy']:.4f} nats/token; {s['tokens_seen']:,} tokens seen in "
                f"{s['train_seconds']:.1f}s; summary in {run.run_dir / 'summary.json'}"]

    def notes(self, run, summary: dict) -> list[str]:
        """How to read the numbers (lm_report.py); rank 0 alone."""
        from .lm_report import closing_lines
        cfg = self.cfg
        if not runs.is_writer():
            return []
        return closing_lines(cfg, summary, cfg.sample_tokens > 0 and cfg.num_samples > 0)

    def sample_lines(self, run, tokenizer, prompt: str | None = None) -> list[str]:
        cfg = self.cfg
        if tokenizer is None:
            return []
        prompt = cfg.sample if prompt is None else prompt
        # a document starts with EOT, as in the training shards
        ids = [tokenizer.eot] + (tokenizer.encode(prompt) if prompt else [])
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        texts = [prompt + tokenizer.decode(
                    sample(run.model, run.schedule, ids, cfg.sample_tokens, cfg.temperature,
                           cfg.top_k, cfg.inference == "stochastic", generator,
                           transport=run.strategy.transport))
                 for _ in range(cfg.num_samples)]
        return [f"--- sample {i} (temperature {cfg.temperature}, top-k {cfg.top_k}) ---\n{text}"
                for i, text in enumerate(texts, 1)]


TASKS = {"image": ImageTask, "lm": LanguageTask}
