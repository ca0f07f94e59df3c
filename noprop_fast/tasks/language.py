"""The language task, NoProp-LM and the GPT baseline (docs/method.md section 7, docs/language.md):
the loss, the validation loss, sampling, and `LanguageTask`, whose run is counted in optimiser
steps, a round being `eval_every` steps ending in the validation loss on the first `eval_tokens`
val tokens. The batch stream, the global generator and the Philox offset are in the checkpoint,
so a resumed run replays its steps exactly. A batch is x, y [N, L] token ids, y the next tokens;
every position is one row of the image task's maths (`noprop.noprop_loss`, u = W_embed[y]).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import continuous, readouts, runs
from ..ops.chunked_ce import cross_entropy_rows
from ..data.shards import TokenBatches, TokenData, unigram_entropy, val_batches
from ..errors import UserError
from ..layers import ALL_BLOCKS
from ..noprop import chain_from_features, noprop_chain, noprop_loss
from ..models.lm import GPT, FlowLanguageModel, LanguageModel
from ..nvtx_ranges import phase
from ..schedule import NoiseSchedule
from .base import Task


def lm_loss(model, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
            blocks: slice = ALL_BLOCKS, noise=None,
            shared_terms: bool = True) -> tuple[torch.Tensor, dict]:
    """(loss, parts): NoProp's block, CE and KL terms over all positions, or the GPT's CE.
    blocks, noise, shared_terms: as in `noprop.noprop_loss`."""
    if model.method == "noprop":
        return noprop_loss(model, schedule, x, y.reshape(-1), blocks, noise, shared_terms)
    if model.method == "noprop-fm":  # one network: no blocks, no schedule
        return continuous.fm_loss(model, x, y.reshape(-1), noise)
    with phase("forward"):
        hidden = model.hidden(x)                              # [N*L, D]
    with phase("loss"):  # the vocabulary head is part of the loss: chunked on the fused path
        ce = model.ops.linear_cross_entropy(hidden, model.tok.weight, model.lm_bias, y.reshape(-1))
    return ce, {"ce": ce.detach()}


def _classifier(model) -> tuple[torch.Tensor, torch.Tensor]:
    if model.method in ("noprop", "noprop-fm"):
        return model.classifier.weight, model.classifier.bias
    return model.tok.weight, model.lm_bias


@torch.no_grad()
def position_logits(model, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Vocabulary logits at every position, [N*L, V] (small inputs only: tests and sampling), of
    NoProp's z_T from the chain or the GPT's last hidden states. Row n*L + i depends on
    x[n, :i+1] only."""
    state = (noprop_chain(model, schedule, x, stochastic, generator).float()
             if model.method == "noprop" else model.hidden(x))
    return F.linear(state, *_classifier(model))


@torch.no_grad()
def fm_chain_losses(model, features: torch.Tensor, target: torch.Tensor, steps: int,
                    solver: str, generator: torch.Generator | None) -> torch.Tensor:
    """NoProp-FM: one ODE chain from z_0 ~ N(0, I) (drawn from `generator`) over `steps` Euler
    or Heun steps, then each row's cross-entropy -log p(y | z_1) with the classifier: [M] fp32.
    features: [1, M, D] (`model.blocks.features`); target: [M] token ids."""
    z = continuous.fm_ode(model, features, steps, solver, generator=generator)  # [M, d]
    return cross_entropy_rows(z.float(), model.classifier.weight, model.classifier.bias, target)


@torch.no_grad()
def validation_loss(model, schedule: NoiseSchedule, batches, stochastic: bool = True,
                    seed: int = 0, chains: int = 1, transport=None, readout: str = "classifier",
                    heldback=None, ode_steps: int = 20, ode_solver: str = "euler",
                    temperatures: bool = False) -> dict:
    """The validation loss over the (x, y) batches, in eval mode, the chains' noise drawn from
    `seed` (the same numbers at every evaluation): {"val_loss", "val_loss_one_chain",
    "val_tokens"}, in nats per token. NoProp: `val_loss` is -log of `readout`'s mean probability
    of y over `chains` chains per position, `val_loss_one_chain` the first chain's alone
    (`readouts.py`), and "readouts" holds every readout's; `heldback`: batches of held-back train
    tokens on which the fitted readout's weights are fitted, and with `temperatures` each
    readout's temperature. The GPT: both are its cross-entropy.
    `transport` (blocks split across processes): the classifier readout, as in
    `noprop.chain_from_features`. NoProp-FM: the classifier on z_1 of its ODE (`ode_steps`
    steps of `ode_solver`) in place of the chain."""
    was_training = model.training
    model.eval()
    try:
        if model.method == "noprop" and transport is None:
            fitted = held = None
            if heldback is not None:  # the temperatures only where asked: 33 scorings a row
                fitted = _scores(model, schedule, heldback, stochastic, seed, chains,
                                 readouts.TEMPERATURES if temperatures else torch.ones(1))
                held = fitted.means() if temperatures else None
            chosen = readouts.chosen_temperatures(held)
            scores = _scores(model, schedule, batches, stochastic, seed, chains,
                             readouts.TEMPERATURES[chosen], keep_rows=fitted is not None)
            table = readouts.readout_losses(scores.means(), chosen, held)
            if fitted is not None:
                table["fitted"] = readouts.fitted_readout(scores.rows(), fitted.rows())
            return {**table[readout], "val_tokens": scores.tokens, "readouts": table}
        return _classifier_loss(model, schedule, batches, stochastic, seed, chains, transport,
                                (ode_steps, ode_solver))
    finally:
        model.train(was_training)


def _scores(model, schedule, batches, stochastic, seed, chains, temperatures,
            keep_rows: bool = True) -> readouts.Scores:
    scores, generator = readouts.Scores(temperatures, keep_rows), None
    for x, y in batches:
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        scores.add(model, schedule, x, y, chains, stochastic, generator)
    return scores


def _classifier_loss(model, schedule, batches, stochastic, seed, chains, transport,
                     ode=(20, "euler")) -> dict:
    """The GPT's cross-entropy, NoProp's classifier readout with the blocks split across
    processes (`transport`), or NoProp-FM's (ode: its steps and solver); y is read only after
    the chains ran."""
    weight, bias = _classifier(model)
    totals, tokens, generator = None, 0, None
    for x, y in batches:
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(seed)
        target = y.reshape(-1)
        if model.method == "noprop":
            features = model.blocks.features(x)               # [T, N*L, D], shared by the chains
            losses = torch.stack([
                cross_entropy_rows(chain_from_features(model, schedule, features, stochastic,
                                                       generator, transport).float(),
                                   weight, bias, target)
                for _ in range(chains)])                      # [K, N*L]: -log p(y | z_T^k)
        elif model.method == "noprop-fm":
            features = model.blocks.features(x)               # [1, N*L, D], shared by the chains
            losses = torch.stack([fm_chain_losses(model, features, target, *ode, generator)
                                  for _ in range(chains)])    # [K, N*L]: -log p(y | z_1^k)
        if model.method in ("noprop", "noprop-fm"):
            mixture = math.log(chains) - torch.logsumexp(-losses, dim=0)
            part = torch.stack([mixture.sum(), losses[0].sum()])
        else:
            ce = cross_entropy_rows(model.hidden(x), weight, bias, target).sum()
            part = torch.stack([ce, ce])
        totals = part if totals is None else totals + part
        tokens += target.numel()
    if tokens == 0:
        raise ValueError("validation_loss: no validation batches")
    mixture_sum, one_sum = totals.tolist()  # host sync: once per evaluation
    return {"val_loss": mixture_sum / tokens, "val_loss_one_chain": one_sum / tokens,
            "val_tokens": tokens}


@torch.no_grad()
def sample(model, schedule: NoiseSchedule, prompt: list[int], num_tokens: int,
           temperature: float = 1.0, top_k: int = 0, stochastic: bool = True,
           generator: torch.Generator | None = None, transport=None,
           readout: str = "classifier", weights=None, ode_steps: int = 20,
           ode_solver: str = "euler") -> list[int]:
    """`num_tokens` tokens continuing `prompt` (a non-empty list of ids), one chain per token
    from `readout`'s distribution (`weights`: the fitted readout's; `transport`: see
    `noprop.chain_from_features`; NoProp-FM: one ODE of `ode_steps` steps of `ode_solver`)."""
    if not prompt:
        raise ValueError("sample: the prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = list(prompt)
    weight, bias = _classifier(model)
    for _ in range(num_tokens):
        x = torch.tensor([ids[-model.max_len:]], device=device)
        if model.method == "noprop" and readout != "classifier":
            logits = readouts.log_probs(model, schedule, x, readout, 1, stochastic,
                                        generator, weights)[-1] / temperature  # [V]
        else:
            if model.method == "noprop":
                last = model.blocks.features(x)[:, -1:]          # [T, 1, D]: the last position
                state = chain_from_features(model, schedule, last, stochastic, generator,
                                            transport)
            elif model.method == "noprop-fm":
                last = model.blocks.features(x)[:, -1:]          # [1, 1, D]: the last position
                state = continuous.fm_ode(model, last, ode_steps, ode_solver,
                                          generator=generator)
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


def estimator(cfg, val: dict) -> str | None:
    """How NoProp-LM's (or -FM's) val_loss was computed, in words (None for the GPT)."""
    if cfg.method == "noprop-fm":
        return (f"{cfg.eval_chains} chains, classifier on z_1 of the {cfg.ode_solver} ODE, "
                f"{cfg.inference_steps} steps")
    if cfg.method != "noprop":
        return None
    words = f"{cfg.eval_chains} chains, readout {cfg.readout}, {cfg.inference} inference"
    if "weights" in val:
        words += (f", weights {val['weights']} (blocks 1..{cfg.num_blocks}, classifier) fitted on "
                  f"{val['heldback_tokens']:,} held-back train tokens")
    elif "temperature" in val:
        words += (f", temperature {val['temperature']:.3f} (one chain "
                  f"{val['temperature_one_chain']:.3f}) fitted on {val['heldback_tokens']:,} "
                  "held-back train tokens")
    return words


def build_lm(cfg, vocab_size: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    if cfg.method == "backprop":
        model = GPT(cfg.num_blocks * cfg.layers_per_block, vocab_size, cfg.seq_len, cfg.width,
                    cfg.heads)
    else:
        cls = FlowLanguageModel if cfg.method == "noprop-fm" else LanguageModel
        model = cls(cfg.num_blocks, vocab_size, cfg.seq_len, cfg.width, cfg.heads,
                    cfg.layers_per_block, cfg.embed_dim,
                    "onehot" if cfg.embed_init == "onehot" else "learned")
        model.block_ce = cfg.block_ce
    return model.to(device)


def held_back(shards: list, tokens: int, seq_len: int) -> tuple[list, list | None, str]:
    """(the train shards less the last `tokens` tokens of the last one, those tokens as a split
    of their own or None for 0, a note or ""): what `--calibrate-tokens` fits the readouts on.
    More than half of the last shard: a tenth of it instead, and the note says so."""
    if tokens == 0:
        return shards, None, ""
    last, note = shards[-1], ""
    if 2 * tokens > len(last):
        tokens, note = len(last) // 10, (f"calibrate_tokens: {tokens:,} is more than half of the "
                                         f"last train shard's {len(last):,} tokens; holding back "
                                         f"a tenth of it, {len(last) // 10:,}")
        if tokens < seq_len + 1:
            raise UserError(f"calibrate_tokens: the last train shard's {len(last):,} tokens are "
                            f"too few to hold back one window of {seq_len + 1}; give 0")
    return [*shards[:-1], last[:-tokens]], [last[-tokens:]], note


@dataclass
class LMProgress:
    """What a checkpoint carries besides the model, the optimiser and the random streams."""
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


class LanguageTask(Task):
    unit, none_yet, state_when, Progress = "step", "none (no evaluation reached)", "at step", \
        LMProgress
    keeps_streams = True  # the batch stream, the global generator and the Philox offset
    loss = staticmethod(lm_loss)

    def __init__(self, cfg, data: TokenData, device: torch.device, data_share=(0, 1)):
        """data_share: (this process's data index, data processes): its windows of each batch."""
        if cfg.method == "backprop" and cfg.embed_init != "learned":
            raise UserError("embed_init: the GPT baseline learns its own embeddings; use learned")
        super().__init__(cfg, data, device, cfg.max_steps)
        index, count = data_share
        self.train_shards, self.heldback, note = held_back(data.train, cfg.calibrate_tokens,
                                                           cfg.seq_len)
        self.heldback_tokens = 0 if self.heldback is None else len(self.heldback[0])
        if note and runs.is_writer():
            print(note, flush=True)
        self.batches = TokenBatches(self.train_shards, cfg.batch_size // count, cfg.seq_len,
                                    device, seed=cfg.seed, rank=index, world_size=count)

    @staticmethod
    def load_data(cfg, show_progress: bool) -> TokenData:
        from ..data.corpus import load_token_data
        from ..preflight import check_token_data
        data = load_token_data(cfg.data_dir, show_progress)
        check_token_data(cfg, data)
        return data

    @staticmethod
    def sampler(cfg, data):
        from ..preflight import sampling_tokenizer
        return sampling_tokenizer(cfg, data)

    def build_model(self, cfg):
        return build_lm(cfg, self.data.vocab_size, self.device)

    def prepare(self, model, pretrain: bool, show_progress: bool) -> None:
        """embed_init mlm: the masked-LM phase (`pretrain`: not when a checkpoint follows), then
        the embeddings frozen (the targets stay put)."""
        cfg = self.cfg
        if cfg.embed_init == "mlm":
            if pretrain:
                from ..mlm import pretrain_embeddings
                stream = TokenBatches(self.train_shards, cfg.batch_size, cfg.seq_len, self.device,
                                      seed=cfg.seed + 2)
                weight = pretrain_embeddings(stream, self.data.vocab_size, cfg.embed_dim,
                                             cfg.seq_len, cfg.mlm_steps, self.device,
                                             seed=cfg.seed, show_progress=show_progress)
                with torch.no_grad():
                    model.embedding.weight.copy_(weight)
                model.matched_filter_classifier()
            model.embedding.weight.requires_grad_(False)
        torch.manual_seed(cfg.seed + 1)  # the reference path's training noise

    def round(self, p: LMProgress, noise):
        """(steps, their (x, y, blocks)): up to the next evaluation."""
        cfg = self.cfg
        steps = min(cfg.eval_every - p.step % cfg.eval_every, cfg.max_steps - p.step)
        return steps, ((*self.batches.next(), ALL_BLOCKS) for _ in range(steps))

    def step_label(self, p: LMProgress) -> tuple[int, str]:
        return p.step, ""

    def bar(self, p: LMProgress, total: int) -> dict:
        return {"total": self.cfg.max_steps, "initial": p.step, "desc": "train"}

    def end_round(self, p: LMProgress, losses: list, seconds: float, seen: int, block_sum):
        tokens = len(losses) * self.cfg.batch_size * self.cfg.seq_len
        p.step, p.tokens_seen = p.step + len(losses), p.tokens_seen + tokens
        p.train_seconds += seconds
        return {"step": p.step, "tokens_seen": p.tokens_seen,
                "train_loss": sum(losses) / max(len(losses), 1),
                "tokens_per_second": tokens / max(seconds, 1e-9)}

    def val_batches(self):
        return val_batches(self.data.val, self.cfg.batch_size, self.cfg.seq_len, self.device,
                           max_tokens=self.cfg.eval_tokens)

    def evaluate(self, model, schedule: NoiseSchedule, transport=None) -> dict:
        cfg = self.cfg
        heldback = None if self.heldback is None else val_batches(
            self.heldback, cfg.batch_size, cfg.seq_len, self.device)
        val = validation_loss(model, schedule, self.val_batches(),
                               stochastic=cfg.inference == "stochastic", seed=cfg.seed,
                               chains=cfg.eval_chains, transport=transport,
                               readout=cfg.readout, heldback=heldback,
                               temperatures=cfg.fit_temperature,
                               ode_steps=cfg.inference_steps, ode_solver=cfg.ode_solver)
        return val if heldback is None else {**val, "heldback_tokens": self.heldback_tokens}

    def eval_fields(self, val: dict) -> dict:
        return {**val, "val_perplexity": math.exp(min(val["val_loss"], 50.0))}

    def round_line(self, r: dict) -> str:
        cfg = self.cfg
        one = (f" [{cfg.eval_chains} chains, {cfg.readout}; one chain "
               f"{r['val_loss_one_chain']:.4f}]" if cfg.method != "backprop" else "")
        return (f"step {r['step']}/{cfg.max_steps}  train loss {r['train_loss']:.4f}  "
                f"val loss {r['val_loss']:.4f} (ppl {r['val_perplexity']:.2f}){one}  "
                f"{r['tokens_per_second']:.0f} tok/s")

    def summary_fields(self, run) -> dict:
        cfg, p, data = self.cfg, run.progress, self.data
        last = p.history[-1] if p.history else {}
        # the unigram entropy of the evaluated val tokens: the loss of a model that knew their
        # exact token frequencies and nothing else
        targets = torch.cat([y.reshape(-1).cpu() for _, y in self.val_batches()])
        return {
            "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
            "num_blocks": cfg.num_blocks, "layers_per_block": cfg.layers_per_block,
            "width": cfg.width,
            "embed_init": cfg.embed_init if cfg.method != "backprop" else None,
            "parameters": run.parameters, "steps": p.step, "tokens_seen": p.tokens_seen,
            "val_loss": last.get("val_loss"), "val_perplexity": last.get("val_perplexity"),
            "val_loss_one_chain": last.get("val_loss_one_chain"),
            "eval_chains": cfg.eval_chains if cfg.method != "backprop" else None,
            "readout": cfg.readout if cfg.method == "noprop" else None,
            "val_estimator": estimator(cfg, last),
            "val_readouts": last.get("readouts"),
            **({"inference_steps": cfg.inference_steps, "ode_solver": cfg.ode_solver}
               if cfg.method == "noprop-fm" else {}),
            "val_tokens": last.get("val_tokens"),
            "unigram_entropy": unigram_entropy(targets.numpy(), data.vocab_size),
            "tokens_per_second": p.tokens_seen / p.train_seconds if p.train_seconds else None}

    def header(self, run) -> str:
        cfg = self.cfg
        depth = cfg.num_blocks * cfg.layers_per_block
        shape = (f"T={cfg.num_blocks} blocks of {cfg.layers_per_block} layer(s)"
                 if cfg.method == "noprop" else f"one network of {depth} layers"
                 if cfg.method == "noprop-fm" else f"{depth} layers")
        return (f"{cfg.method} LM on {self.data.source}, {shape}, width {cfg.width}, "
                f"{run.parameters / 1e6:.2f}M parameters")

    def closing(self, run, s: dict) -> list[str]:
        cfg = self.cfg
        chains = (f", {s['val_estimator']}; one chain {s['val_loss_one_chain']:.4f}"
                  if cfg.method != "backprop" else "")
        return [f"val loss {s['val_loss']:.4f} nats/token (perplexity {s['val_perplexity']:.2f}"
                f"{chains}) on {s['val_tokens']:,} val tokens, whose unigram entropy is "
                f"{s['unigram_entropy']:.4f} nats/token; {s['tokens_seen']:,} tokens seen in "
                f"{s['train_seconds']:.1f}s; summary in {run.run_dir / 'summary.json'}"]

    def notes(self, run, summary: dict) -> list[str]:
        """How to read the numbers (reports.py); rank 0 alone."""
        from ..reports import closing_lines
        cfg = self.cfg
        if not runs.is_writer():
            return []
        return closing_lines(cfg, summary, cfg.sample_tokens > 0 and cfg.num_samples > 0)

    def sample_lines(self, run, tokenizer) -> list[str]:
        cfg = self.cfg
        if tokenizer is None:
            return []
        # a document starts with EOT, as in the training shards
        ids = [tokenizer.eot] + (tokenizer.encode(cfg.sample) if cfg.sample else [])
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        history = run.progress.history
        fitted = (history[-1].get("readouts") or {}).get("fitted", {}) if history else {}
        return [f"--- sample {i} (temperature {cfg.temperature}, top-k {cfg.top_k}) ---\n"
                + cfg.sample + tokenizer.decode(sample(
                    run.model, run.schedule, ids, cfg.sample_tokens, cfg.temperature, cfg.top_k,
                    cfg.inference == "stochastic", generator, transport=run.strategy.transport,
                    readout=cfg.readout, weights=fitted.get("weights_one_chain"),
                    ode_steps=cfg.inference_steps, ode_solver=cfg.ode_solver))
                for i in range(1, cfg.num_samples + 1)]
