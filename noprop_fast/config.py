"""Run configuration: one dataclass per task, YAML files mapped onto it, a CLI generated from it
(docs/usage.md, "Configs": defaults, then the YAML config, then the command line; a bad key or
value is a one-line `ConfigError`)."""
import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import readouts, threads
from .errors import ConfigError, UserError
from .schedule import NoiseSchedule, cosine_alpha_bar

CONFIG_DIR = Path(__file__).parent / "configs"


def _opt(default, help: str, choices: tuple | None = None, minimum: float | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


def _task_default(name: str, default, **meta):
    """A `TaskConfig` field again, with this task's default (and help or minimum, if given)."""
    return field(default=default,
                 metadata={**TaskConfig.__dataclass_fields__[name].metadata, **meta})


@dataclass
class TaskConfig:
    """The fields both tasks have. Defaults: the image task's (the paper's); `LMConfig` redeclares
    the few whose default differs there. `DEFAULT` names the config used when none is."""
    task: str = _opt("image", "which task this config is for", ("image",))
    method: str = _opt("noprop", "noprop: NoProp-DT (image) or NoProp-LM (lm); backprop: the same "
                       "blocks trained end to end (lm: a GPT of the same width and total depth)",
                       ("noprop", "backprop"))
    data_dir: str | None = _opt(None, "image: a folder with a datasets save or the original "
                                "files (none: the hub, for mnist and cifar); lm: a folder of token "
                                "shards (*_train_*.bin, *_val_*.bin, e.g. fineweb10B; none: the "
                                "embedded corpus, built on first use)")
    num_blocks: int = _opt(10, "T, the number of blocks (denoising steps)", minimum=1)
    embed_dim: int = _opt(20, "d of learned embeddings (one-hot: d = classes; prototype: d = "
                          "pixels)", minimum=1)
    snr_max: float = _opt(100.0, "abar is clamped to snr_max / (1 + snr_max), so SNR(T) is finite",
                          minimum=1e-6)
    eta: float = _opt(0.1, "scale of the SNR-weighted denoising loss", minimum=1e-12)
    batch_size: int = _opt(128, "minibatch size", minimum=2)
    lr: float = _opt(1e-3, "AdamW learning rate (constant, as in the paper)", minimum=0.0)
    weight_decay: float = _opt(1e-3, "AdamW decoupled weight decay", minimum=0.0)
    inference: str = _opt("stochastic", "Eq. 3 with its noise, or the noise-free variant "
                          "(eps_t = 0)", ("stochastic", "noise-free"))
    eval_every: int = _opt(1, "evaluate test accuracy every this many epochs (and at the end)",
                           minimum=1)
    fused: bool = _opt(False, "fused ops: Triton kernels on CUDA, C++ ops on CPU (built on first "
                       "use); image: convs and BatchNorm stay in PyTorch; lm: a chunked vocabulary "
                       "cross-entropy")
    precision: str = _opt("fp32", "the blocks' compute dtype (weights and optimiser state stay "
                          "fp32; fp16 adds loss scaling); bf16 is what a GPU run should use; fp16 "
                          "(image: its convs) is slow on most CPUs", ("fp32", "bf16", "fp16"))
    cuda_graphs: str = _opt("auto", "capture each training step in a CUDA graph (graphs.py); "
                            "auto: where it can be (CUDA, --fused, not fp16), else one line says "
                            "why; on: as auto, the line also on a CPU; off: never",
                            ("auto", "on", "off"))
    seed: int = _opt(0, "seeds weights, noise, the batch order and evaluation")
    device: str = _opt("auto", "auto: cuda when present, else cpu", ("auto", "cpu", "cuda"))
    # multi-process training (distributed.py), launched with torchrun
    parallel: str = _opt("none", "multi-process training under torchrun: blocks: the T blocks "
                         "split across the processes; data: each process a share of every batch; "
                         "blocks+data: both (--block-ranks x data ranks = processes)",
                         ("none", "blocks", "data", "blocks+data"))
    block_ranks: int = _opt(0, "processes that split the blocks (blocks+data: required; blocks: "
                            "0 = all of them; data: 0 or 1)", minimum=0)
    dist_timeout: float = _opt(300.0, "seconds a process waits in a collective before the run "
                               "stops (a process that failed or hangs ends the others)",
                               minimum=1.0)
    out: str | None = _opt(None, "run folder; default runs/<dataset>-<method>-<time> (lm: "
                           "runs/lm-<method>-<time>)")

    DEFAULT: typing.ClassVar[str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        """Choices, minimums, a schedule for (num_blocks, snr_max), then the task's `check`."""
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}")
            if meta.get("minimum") is not None and value < meta["minimum"]:
                raise ConfigError(f"{f.name}: {value!r} is below its minimum {meta['minimum']}")
        try:
            cosine_alpha_bar(self.schedule_blocks, self.snr_max)
            NoiseSchedule.cosine(self.schedule_blocks, self.snr_max, self.eta)
        except ValueError as err:
            raise ConfigError(f"snr_max / num_blocks: {err}") from None
        self.check()
        return self

    def check(self) -> None:
        """What a task's fields must satisfy together."""

    @property
    def schedule_blocks(self) -> int:
        """The T of the fixed cosine schedule: num_blocks, except for the one-network methods
        (NoProp-CT and -FM), which do not use it."""
        return 1 if self.method in ("noprop-ct", "noprop-fm") else self.num_blocks


@dataclass
class ImageConfig(TaskConfig):
    method: str = _task_default(
        "method", "noprop", choices=("noprop", "noprop-ct", "noprop-fm", "backprop"),
        help="noprop: NoProp-DT (T blocks); noprop-ct: NoProp-CT (one network, continuous t, "
        "learned schedule); noprop-fm: NoProp-FM (one network, flow matching); backprop: the "
        "DT blocks trained end to end")
    dataset: str = _opt("digits", "digits ships with scikit-learn, so it runs offline",
                        ("digits", "mnist", "cifar10", "cifar100"))
    embedding: str = _opt("onehot", "class embedding W_embed", ("onehot", "learned", "prototype"))
    classifier_init: str = _opt("embedding", "embedding: the classifier starts as a matched filter "
                                "on W_embed (row y = u_y / ||u_y||^2); random: nn.Linear's "
                                "default", ("embedding", "random"))
    block_schedule: str = _opt("all", "all: every block on every minibatch (one pass per epoch); "
                               "sequential: the paper's one block per pass, one block in memory",
                               ("all", "sequential"))
    epochs: int = _opt(100, "passes over the training data (sequential: T passes each)", minimum=1)
    dropout: float = _opt(0.2, "dropout in the conv branch", minimum=0.0)
    # NoProp-CT and -FM (docs/method.md section 5)
    inference_steps: int = _opt(1000, "noprop-ct: points of the Eq. 3 grid t_k = k / S; "
                                "noprop-fm: ODE steps (the paper: 1000)", minimum=1)
    ode_solver: str = _opt("euler", "noprop-fm: the ODE solver (heun: second order, two field "
                           "evaluations a step)", ("euler", "heun"))
    fm_readout: str = _opt("nearest", "noprop-fm: the class of z_1: its nearest class embedding, "
                           "or the classifier (trained by the anchor, so learned or prototype "
                           "embeddings only)", ("nearest", "classifier"))
    ct_snr_min: float = _opt(1e-3, "noprop-ct: SNR(0), the fixed noisy end of the learned "
                             "schedule", minimum=1e-12)
    ct_snr_max: float = _opt(10.0, "noprop-ct: SNR(1), its fixed clean end (NoProp-DT's is "
                             "snr_max; docs/method.md section 5 says why CT's is lower)",
                             minimum=1e-12)

    DEFAULT = "digits"  # the config --task image uses when none is named

    def check(self) -> None:
        if self.dropout >= 1:
            raise ConfigError(f"dropout: {self.dropout} must be below 1")
        one_network = self.method in ("noprop-ct", "noprop-fm")
        if one_network and self.block_schedule != "all":
            raise ConfigError(f"block_schedule: {self.method} trains one network, so there are "
                              "no blocks to schedule; use block_schedule all")
        if one_network and self.parallel != "none":
            raise ConfigError(f"parallel: {self.method} runs in one process (--parallel splits "
                              "NoProp-DT's blocks or batches)")
        if self.method == "noprop-ct" and not self.ct_snr_min < self.ct_snr_max:
            raise ConfigError(f"ct_snr_min: {self.ct_snr_min:g} must be below ct_snr_max "
                              f"({self.ct_snr_max:g})")
        if (self.method == "noprop-fm" and self.fm_readout == "classifier"
                and self.embedding == "onehot"):
            raise ConfigError("fm_readout: the classifier is trained by the anchor, which "
                              "learned or prototype embeddings have; one-hot uses nearest")


@dataclass
class LMConfig(TaskConfig):
    """The language task. The defaults are the CPU config (`stdlib`): the embedded corpus, bytes."""
    # the defaults that differ from the image task's, and what the field means here
    task: str = _task_default("task", "lm", choices=("lm",))
    method: str = _task_default(
        "method", "noprop", choices=("noprop", "noprop-fm", "backprop"),
        help="noprop: NoProp-LM (T blocks); noprop-fm: NoProp-FM (one network of num_blocks x "
        "layers_per_block causal layers, flow matching on the token embeddings); backprop: a GPT "
        "of the same width and total depth")
    num_blocks: int = _task_default("num_blocks", 6, help="T, the number of blocks (denoising "
                                    "steps); the GPT has T x layers_per_block layers")
    embed_dim: int = _task_default("embed_dim", 64, help="d of the token embedding W_embed (the "
                                   "denoising targets)")
    batch_size: int = _task_default("batch_size", 32, minimum=1, help="windows per step (batch_size"
                                    " x seq_len tokens)")  # minimum 1: no BatchNorm here
    eval_every: int = _task_default("eval_every", 200, help="steps between validation losses (and "
                                    "checkpoints)")
    layers_per_block: int = _opt(1, "causal transformer layers in each block", minimum=1)
    width: int = _opt(128, "D, every block's (and the GPT's) model width", minimum=8)
    heads: int = _opt(4, "attention heads (width / heads is the head size)", minimum=1)
    embed_init: str = _opt("learned", "learned: W_embed trained jointly; mlm: pre-trained with a "
                           "masked-LM phase, then frozen; onehot: the fixed identity (d = V, small "
                           "vocabularies only)", ("learned", "mlm", "onehot"))
    mlm_steps: int = _opt(300, "steps of the masked-LM phase (embed_init mlm)", minimum=1)
    seq_len: int = _opt(128, "L, tokens of context per window", minimum=2)
    max_steps: int = _opt(800, "optimiser steps in the run", minimum=1)
    eval_tokens: int = _opt(65536, "validation tokens per evaluation (from the start of the val "
                            "split; the final evaluation uses the same ones)", minimum=1)
    eval_chains: int = _opt(8, "K, chains per position in the validation loss: -log of the mean "
                            "over K chains of p(y | z_T) (K = 1: one chain's cross-entropy, also "
                            "reported)", minimum=1)
    block_ce: float = _opt(0.0, "weight of a local cross-entropy on each block's own softmax "
                           "over the vocabulary (block t's term trains block t alone); 0: off; "
                           "NoProp-LM's blocks only (noprop-fm and the GPT have none)",
                           minimum=0.0)
    readout: str = _opt("classifier", "the predictive distribution val_loss and samples use: "
                        "classifier: the classifier on z_T; last, first: the last or the first "
                        "block's softmax; blocks: the mean of every block's softmax along the "
                        "chain; fitted: the blocks' softmaxes and the classifier mixed with "
                        "weights fitted on held-back tokens (needs --calibrate-tokens); "
                        "noprop-fm reads its classifier on z_1 whatever this says",
                        readouts.CHOICES)
    calibrate_tokens: int = _opt(0, "hold back the train split's last this many tokens and fit "
                                 "the fitted readout's weights on them at each evaluation; 0: off",
                                 minimum=0)
    fit_temperature: bool = _opt(False, "with calibrate_tokens: also fit each readout's "
                                 "temperature on the held-back tokens (33 candidates, 2^-2..2^2; "
                                 "a slower evaluation)")
    sample: str | None = _opt("The ", "prompt whose continuations are printed at the end (--sample "
                              "with --resume samples from a finished run)")
    sample_tokens: int = _opt(200, "tokens per sample; 0: no samples", minimum=0)
    num_samples: int = _opt(2, "continuations printed", minimum=1)
    temperature: float = _opt(0.8, "sampling temperature", minimum=1e-6)
    top_k: int = _opt(40, "sample from the k most likely tokens; 0: all", minimum=0)
    # NoProp-FM (docs/method.md section 5, one row per position)
    inference_steps: int = _opt(20, "noprop-fm: ODE steps from noise to z_1 (validation and "
                                "samples)", minimum=1)
    ode_solver: str = _opt("euler", "noprop-fm: the ODE solver (heun: second order, two field "
                           "evaluations a step)", ("euler", "heun"))

    DEFAULT = "stdlib"  # the config --task lm uses when none is named

    def check(self) -> None:
        if self.method == "noprop-fm" and self.parallel != "none":
            raise ConfigError("parallel: noprop-fm runs in one process (--parallel splits "
                              "NoProp-LM's blocks or batches)")
        if (self.readout != "classifier" or self.calibrate_tokens) and \
                self.parallel in ("blocks", "blocks+data"):
            raise ConfigError(f"readout: {self.readout} (calibrate_tokens "
                              f"{self.calibrate_tokens}) reads every block at every position; "
                              "with --parallel blocks use --readout classifier "
                              "--calibrate-tokens 0")
        if self.readout == "fitted" and not self.calibrate_tokens:
            raise ConfigError("readout: fitted mixes with weights fitted on held-back tokens; "
                              "give --calibrate-tokens")
        if self.width % self.heads:
            raise ConfigError(f"width: {self.width} is not a multiple of heads ({self.heads})")
        if (self.width // self.heads) not in (16, 32, 64, 128):
            raise ConfigError(f"heads: the head size width / heads = {self.width // self.heads} "
                              "must be one of 16, 32, 64, 128")
        if self.method == "noprop-fm" and self.embed_init != "learned":
            raise ConfigError("embed_init: noprop-fm's classifier is trained by its anchor, "
                              "which needs learned embeddings; use embed_init learned")


TASK_CONFIGS = {"image": ImageConfig, "lm": LMConfig}


def _coerce(name: str, value, annotation):
    """YAML or command-line value -> the field's type, or a ConfigError naming the field."""
    if value is None:
        if type(None) in typing.get_args(annotation):
            return None
        raise ConfigError(f"{name}: a value is required")
    kind = (typing.get_args(annotation) or (annotation,))[0]
    try:
        if kind is bool and isinstance(value, str):  # a command line's text, or YAML's "yes"
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                     "no": False}[value.lower()]
        if kind is not str and isinstance(value, bool) != (kind is bool):
            raise ValueError  # True is no number, and 1 no switch
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def from_mapping(values: dict, source: str, base=None, cls=ImageConfig):
    """Apply a mapping of field -> value onto `base` (or the defaults)."""
    cfg = dataclasses.replace(base) if base is not None else cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in {source} (valid keys: "
                              f"{', '.join(sorted(known))})")
        setattr(cfg, key, _coerce(key, value, hints[key]))
    return cfg


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        raise ConfigError(f"no config named {name_or_path!r} (see --list-configs) and no such file")
    return packaged


def read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({' '.join(str(err).split())})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def load_config(name_or_path: str, cls=ImageConfig):
    path = config_path(name_or_path)
    return from_mapping(read_yaml(path), str(path), cls=cls)


def list_configs() -> list[tuple[str, str]]:
    """(name, description) of every packaged config; the description is the file's first comment,
    after "[default, --task TASK]" for the config a task uses when none is named."""
    defaults = {cls.DEFAULT: task for task, cls in TASK_CONFIGS.items()}
    rows = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = (path.read_text().splitlines() or [""])[0]
        mark = f"[default, --task {defaults[path.stem]}] " if path.stem in defaults else ""
        rows.append((path.stem, mark + first.lstrip("# ").strip()))
    return rows


def resolve(config: str | None, overrides: dict, base=None, cls=ImageConfig):
    """The final config: base (a resumed run's) or the named config file, then the overrides."""
    if base is None:
        base = load_config(config or cls.DEFAULT, cls)
    return from_mapping(overrides, "the command line", base=base, cls=cls).validate()


def config_text(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# -- the command lines' parsers (train, compare, data.prepare) ---------------------------------
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints its usage and exits on a bad option; the CLIs want a one-line ConfigError."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def add_config_arguments(parser: argparse.ArgumentParser, cls=ImageConfig,
                         config: str | None = None) -> None:
    """One `--field-name` option per config field; unset options stay out of the namespace. Each
    help line ends in what a run without that option uses: the value of `config` (default: the
    task's default config) where the file sets it, else the dataclass default."""
    name = config or cls.DEFAULT
    try:
        path = config_path(name)
        from_file = read_yaml(path)
        base = from_mapping(from_file, str(path), cls=cls)
    except ConfigError:  # the dataclass defaults; the run itself reports the config
        base, name, from_file = cls(), None, {}
    group = parser.add_argument_group(
        "config fields (override the config file)",
        f"[default ...] is what a run without the option uses: the {name} config's value where it "
        "sets one (marked), else the built-in default" if name else None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "task":
            continue  # chosen with --task
        meta, value = f.metadata, getattr(base, f.name)
        if hints[f.name] is bool:  # a switch: `--fused` turns it on
            kwargs, value = {"action": "store_const", "const": True}, "on" if value else "off"
        else:
            kind = (typing.get_args(hints[f.name]) or (hints[f.name],))[0]
            kwargs = {"metavar": kind.__name__.upper()}
        choices = f" ({'|'.join(meta['choices'])})" if meta["choices"] else ""
        where = f", {name} config" if f.name in from_file else ""
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs,
                           default=argparse.SUPPRESS,
                           help=f"{meta['help']}{choices} [default {value}{where}]")


def task_parser(prog: str, description: str, task: str, task_help: str) -> OneLineArgumentParser:
    """--task and --config; the command adds its own options, then `add_run_arguments`."""
    parser = OneLineArgumentParser(prog=prog, description=f"{description} The config fields "
                                   f"listed are those of --task {task}.")
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="image",
                        help=f"{task_help} [default image]")
    parser.add_argument("--config", metavar="NAME_OR_PATH", help="packaged config name or YAML "
                        f"file [default {TASK_CONFIGS[task].DEFAULT}]")
    return parser


def add_run_arguments(parser, task: str, config: str | None, overwrite_help: str):
    """--overwrite, --no-progress, --threads, then the config fields of `task` (over `config`)."""
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", metavar="N", type=threads.check_count,
                        help="intra-op threads on a CPU [default one per core, or OMP_NUM_THREADS; "
                             "waiting threads sleep, so a core shared with other work does not "
                             "stall the run]")
    add_config_arguments(parser, TASK_CONFIGS[task], config)
    return parser


def parse_task_args(argv: list[str] | None, build_parser, resume: bool = False):
    """The task first (it decides which config fields exist), then `build_parser(task, config)`.
    Without --task: the task of the --config file (or of the --resume run), else image."""
    pre = OneLineArgumentParser(add_help=False)
    pre.add_argument("--task", choices=sorted(TASK_CONFIGS))
    pre.add_argument("--config")
    if resume:
        pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    task = known.task or implied_task(known.config, getattr(known, "resume", None))
    args = build_parser(task, known.config).parse_args(argv)
    args.task = task
    return args


def implied_task(config: str | None, resume: str | None) -> str:
    """The `task` key of the named config or of the resumed run's config.yaml (image if none)."""
    try:
        path = Path(resume) / "config.yaml" if resume else config_path(config) if config else None
    except UserError:
        return "image"  # the full parse reports the missing config
    task = read_yaml(path).get("task") if path is not None and path.is_file() else None
    return task if task in TASK_CONFIGS else "image"


def field_overrides(args: argparse.Namespace) -> dict:
    """The config fields given on the command line (but --task): {field: text}."""
    names = {f.name for f in dataclasses.fields(TASK_CONFIGS[args.task])} - {"task"}
    return {k: v for k, v in vars(args).items() if k in names}
