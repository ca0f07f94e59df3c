"""What a run prints at its end and what `python -m noprop_fast.compare` writes, for both tasks:
an image run's closing table (`results_table`), a language-model run's closing lines
(`closing_lines`; docs/language.md, "Reading a language-model run"), a comparison's tables, charts
and report.md (`write_report`; docs/usage.md, "The comparison report")."""
import datetime
import json
import shlex
from pathlib import Path

BASELINE = "backprop"  # the memory ratio is against this method; the GPT has no one-chain loss
# what a report and its charts call each (task, method); --methods and the run folders use the keys
DISPLAY_NAMES = {
    ("image", "noprop"): "NoProp-DT",
    ("image", "noprop-ct"): "NoProp-CT",
    ("image", "noprop-fm"): "NoProp-FM",
    ("image", "backprop"): "backprop",
    ("lm", "noprop"): "NoProp-LM",
    ("lm", "noprop-fm"): "NoProp-FM (LM)",
    ("lm", "backprop"): "backprop GPT",
}
MEMORY_KINDS = {
    "cuda_peak_allocated": "CUDA allocator peak",
    "cpu_saved_for_backward": "CPU activation bytes saved for backward (saved-tensor hooks)",
}
REPORTS = Path("reports")  # where `python -m noprop_fast.compare --task lm` writes by default
# what must agree for a comparison's GPT to be "a GPT of the same size on the same tokens"
SAME_SHAPE = ("data_dir", "num_blocks", "layers_per_block", "width", "heads", "seq_len")
# below this many tokens seen, a model of this engine's sizes does not write readable text yet
FEW_TOKENS = 100_000_000


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def display_name(method: str, task: str = "image") -> str:
    """The name a report gives a method: NoProp-DT, NoProp-CT, NoProp-FM, backprop (image)."""
    return DISPLAY_NAMES.get((task, method), method)


def prediction_steps(method: str, summary: dict, cfg=None) -> str | None:
    """How many steps a NoProp-CT or -FM run predicts with, in words ("1000 steps", "100 heun
    steps"), from its summary, else from `cfg`; None for the other methods or when neither says."""
    if method not in ("noprop-ct", "noprop-fm"):
        return None
    steps = summary.get("inference_steps", getattr(cfg, "inference_steps", None))
    if steps is None:
        return None
    solver = summary.get("ode_solver", getattr(cfg, "ode_solver", None))
    return f"{steps} {solver} steps" if method == "noprop-fm" and solver else f"{steps} steps"


def results_table(history: list[dict]) -> str:
    """An image run's closing table: one row per epoch."""
    lines = ["epoch  train loss  test acc  seconds  img/s",
             "-----  ----------  --------  -------  -----"]
    for r in history:
        acc = _fmt(r.get("test_accuracy"), ".4f")
        lines.append(f"{r['epoch']:>5}  {r['train_loss']:>10.4f}  {acc:>8}  "
                     f"{r['epoch_seconds']:>7.2f}  {r['images_per_second']:>5.0f}")
    return "\n".join(lines)


# -- a language-model run's closing lines ---------------------------------------------------------
def compare_command(cfg) -> str:
    """The command that trains NoProp-LM and the GPT of this run's shape on the same tokens."""
    argv = ["python", "-m", "noprop_fast.compare", "--task", "lm",
            "--config", str(Path(cfg.out) / "config.yaml")]
    if cfg.embed_init != "learned":  # the GPT learns its own embeddings: compare needs learned
        argv += ["--embed-init", "learned"]
    return shlex.join(argv)


def gpt_reference(cfg, summary: dict, reports: Path = REPORTS) -> dict | None:
    """{"val_loss", "tokens_seen", "source"} of the GPT of this run's shape on the same val tokens:
    this run if it is the GPT, else the newest matching comparison under `reports`; None if none."""
    if cfg.method == BASELINE:
        return {"val_loss": summary["val_loss"], "tokens_seen": summary["tokens_seen"],
                "source": "this run"}
    found = []
    for path in Path(reports).glob("compare-lm-*/summary.json"):
        try:
            report = json.loads(path.read_text())
            config, gpt = report["config"], report["runs"][BASELINE]
            same = all(config.get(k) == getattr(cfg, k) for k in SAME_SHAPE)
            if same and gpt["val_tokens"] == summary["val_tokens"] and gpt["val_loss"] is not None:
                found.append((path.stat().st_mtime, path, gpt))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another report's shape, or not a comparison's summary: not this run's GPT
    if not found:
        return None
    _, path, gpt = max(found, key=lambda item: item[0])
    return {"val_loss": gpt["val_loss"], "tokens_seen": gpt["tokens_seen"], "source": str(path)}


def closing_lines(cfg, summary: dict, samples_follow: bool, reports: Path = REPORTS) -> list[str]:
    """What the val loss, the train loss and the samples mean, one line each."""
    val, entropy = summary["val_loss"], summary["unigram_entropy"]
    gap = entropy - val
    lines = [
        "reading the val loss: lower is better. A model that knows only how often each token "
        f"occurs scores the unigram entropy of these val tokens, {entropy:.4f} nats/token; "
        + (f"this run is {gap:.4f} below it." if gap > 0 else
           f"this run is {-gap:.4f} above it, not yet better than counting tokens.")]
    gpt = gpt_reference(cfg, summary, reports)
    if gpt is None:
        lines.append("A GPT of the same width and depth on the same tokens: "
                     f"`{compare_command(cfg)}` trains both and reports it.")
    elif gpt["source"] == "this run":
        lines.append("This run is the GPT baseline; NoProp-LM of the same width and depth on the "
                     f"same tokens: `{compare_command(cfg)}`.")
    else:
        lines.append(f"A GPT of the same width and depth reached {gpt['val_loss']:.4f} on the same "
                     f"val tokens after {gpt['tokens_seen']:,} tokens ({gpt['source']}).")
    if cfg.method == "noprop":
        own = (f", plus {cfg.block_ce:g} x each block's own cross-entropy" if cfg.block_ce
               else "")
        lines.append("train loss (in the lines above) is the NoProp objective: the blocks' "
                     f"SNR-weighted denoising errors{own}, plus the classifier's cross-entropy on "
                     "a noisy copy of the true token's embedding, plus a KL term. It is not a "
                     "cross-entropy of predicted tokens and is not comparable with the val loss.")
    elif cfg.method == "noprop-fm":
        lines.append("train loss (in the lines above) is the NoProp-FM objective: the vector "
                     "field's squared error, plus the anchor's cross-entropy and alignment on the "
                     "one-step estimate of z_1. It is not comparable with the val loss.")
    else:
        lines.append("train loss (in the lines above) is the GPT's cross-entropy on its training "
                     "batches, in nats/token like the val loss.")
    small = summary.get("tokenizer") == "byte" or summary["tokens_seen"] < FEW_TOKENS
    if samples_follow and small:
        kind = "byte-level " if summary.get("tokenizer") == "byte" else ""
        lines.append(f"The samples below come from a small {kind}model "
                     f"({summary['parameters'] / 1e6:.1f}M parameters, {summary['tokens_seen']:,} "
                     "tokens seen): expect them to read as gibberish, with the corpus's letters, "
                     "spacing and frequent words but little sense.")
    return lines


# -- a comparison's tables ----------------------------------------------------------------------
def results_markdown(runs: dict[str, dict], task: str = "image") -> str:
    """One row per method. image: accuracy, time, memory, what the memory is, ratio to the
    baseline, NoProp-DT's block schedule and NoProp-CT's or -FM's steps beside the name; lm: final
    val loss, one chain's, perplexity, unigram entropy, throughput."""
    if task == "lm":
        lines = ["| method | val loss (nats/token) | one chain | perplexity | unigram entropy "
                 "| tokens seen | train s | tokens/s | parameters |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, s in runs.items():
            one_chain = None if method == BASELINE else s["val_loss_one_chain"]
            lines.append(f"| {method} | {_fmt(s['val_loss'], '.4f')} | {_fmt(one_chain, '.4f')} "
                         f"| {_fmt(s['val_perplexity'], '.2f')} | {s['unigram_entropy']:.4f} "
                         f"| {s['tokens_seen']:,} | {s['train_seconds']:.2f} "
                         f"| {_fmt(s['tokens_per_second'], ',.0f')} | {s['parameters']:,} |")
        return "\n".join(lines)
    base = runs.get(BASELINE, {}).get("peak_memory_bytes")
    lines = ["| method | test accuracy (%) | train s / epoch | peak memory (MiB) | memory is "
             f"| memory / {BASELINE} |", "|---|---:|---:|---:|---|---:|"]
    for method, s in runs.items():
        acc = None if s["test_accuracy"] is None else 100 * s["test_accuracy"]
        ratio = s["peak_memory_bytes"] / base if base else None
        detail = s.get("block_schedule") or prediction_steps(method, s)
        name = method if detail is None else f"{method} ({detail})"
        lines.append(f"| {name} | {_fmt(acc, '.2f')} | {s['seconds_per_epoch']:.2f} "
                     f"| {s['peak_memory_bytes'] / 2**20:.1f} "
                     f"| {MEMORY_KINDS.get(s['memory_kind'], s['memory_kind'])} "
                     f"| {_fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def epochs_markdown(histories: dict[str, list[dict]]) -> str:
    """Per epoch: train loss and test accuracy of every method ('-' where not evaluated)."""
    methods = list(histories)
    lines = ["| epoch | " + " | ".join(f"{m} loss | {m} acc (%)" for m in methods) + " |",
             "|---:|" + "---:|---:|" * len(methods)]
    by_epoch = {m: {r["epoch"]: r for r in h} for m, h in histories.items()}
    for epoch in sorted({e for rows in by_epoch.values() for e in rows}):
        cells = []
        for m in methods:
            r = by_epoch[m].get(epoch, {})
            acc = r.get("test_accuracy")
            cells += [_fmt(r.get("train_loss"), ".4f"),
                      _fmt(None if acc is None else 100 * acc, ".2f")]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def equal_tokens_markdown(histories: dict[str, list[dict]]) -> str:
    """One row per evaluation, keyed by tokens seen; '-' where a method has no evaluation there."""
    methods = list(histories)
    by_tokens = {m: {r["tokens_seen"]: r for r in h} for m, h in histories.items()}
    # (method, field, heading): NoProp's one-chain loss beside its val loss
    columns = [(m, f, f"{m} {h}") for m in methods
               for f, h in [("val_loss", "val loss")]
               + ([("val_loss_one_chain", "one chain")] if m != BASELINE else [])]
    lines = ["| step | tokens seen | " + " | ".join(c[2] for c in columns) + " |",
             "|---:|---:|" + "---:|" * len(columns)]
    for tokens in sorted({t for rows in by_tokens.values() for t in rows}):
        records = [by_tokens[m].get(tokens) for m in methods]
        steps = sorted({r["step"] for r in records if r is not None})
        cells = [_fmt(by_tokens[m].get(tokens, {}).get(f), ".4f") for m, f, _ in columns]
        lines.append(f"| {'/'.join(map(str, steps))} | {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- a comparison's charts and report ---------------------------------------------------------
def write_plots(runs: dict[str, dict], histories: dict[str, list[dict]], out_dir: Path,
                data_dir: str | None = None) -> None:
    """image: loss.png and accuracy.png per epoch, time.png and memory.png one bar per method;
    lm: val_loss.png against tokens seen, the unigram entropy dashed (`data_dir`: for the title)."""
    from .plots import bar_chart, curves

    first, methods = next(iter(runs.values())), list(runs)
    if first.get("task") == "lm":  # the two train losses are not comparable: no chart of them
        curves(histories, first, out_dir, None, data_dir)
        return
    names = [display_name(m) for m in methods]
    # log scale: the objectives (NoProp-DT's denoising + CE + KL, backprop's cross-entropy, ...)
    curves(dict(zip(names, histories.values())), first, out_dir, "each method's own objective")
    where = f"{first['dataset']}, {first['device']}"
    seconds = [runs[m]["seconds_per_epoch"] for m in methods]
    bar_chart(names, seconds, [f"{s:.2f} s" for s in seconds], "train seconds per epoch",
              f"Time per epoch: {where}", out_dir / "time.png")
    mib = [runs[m]["peak_memory_bytes"] / 2**20 for m in methods]
    base = runs.get(BASELINE, {}).get("peak_memory_bytes")
    captions = [f"{v:.1f} MiB" + (f"\n{runs[m]['peak_memory_bytes'] / base:.2f} x {BASELINE}"
                                  if base else "") for m, v in zip(methods, mib)]
    kind = MEMORY_KINDS.get(first["memory_kind"], first["memory_kind"])
    # why NoProp-DT saves nothing when it trains every block on every step
    all_blocks = runs.get("noprop", {}).get("block_schedule") == "all"
    note = ("NoProp-DT here trains all blocks on every step, so it holds every block's "
            "activations, as backprop does: the saving comes with --block-schedule sequential (one "
            "block's activations at a time).") if all_blocks else None
    bar_chart(names, mib, captions, f"MiB: {kind}", f"Memory: {where}", out_dir / "memory.png",
              note=note)


def data_name(cfg) -> str:
    """What a comparison calls its data: the dataset, the shard folder, or the embedded corpus."""
    if cfg.task == "image":
        return cfg.dataset
    return cfg.data_dir if cfg.data_dir is not None else "the embedded corpus (Python's docs)"


def method_lines(cfg, runs: dict[str, dict]) -> list[str]:
    """One bullet per image method run: what it trains on and how it predicts (with its measured
    prediction time where the summary has it)."""
    steps = {m: prediction_steps(m, s, cfg) or "its configured number of steps"
             for m, s in runs.items()}
    fm_readout = runs.get("noprop-fm", {}).get("readout", getattr(cfg, "fm_readout", "nearest"))
    texts = {
        "noprop": f"T = {cfg.num_blocks} blocks, each trained alone to denoise a noisy class "
                  "embedding (its error weighted by the SNR step of its block), plus the "
                  "classifier's cross-entropy on z_T and a KL term. Predicts by the Eq. 3 chain "
                  "through the T blocks, then the classifier on z_T.",
        "noprop-ct": "one network with the time t as an input, t drawn per example; loss: the "
                     "classifier's cross-entropy + KL + the denoising error weighted by SNR'(t) "
                     "of a learned noise schedule. Predicts by the Eq. 3 chain over the points "
                     f"of a grid on t ({steps.get('noprop-ct')}), then the classifier on z_1.",
        "noprop-fm": "one network with the time t as an input, regressed on the vector field "
                     "u_y - z_0 along z_t = t u_y + (1 - t) z_0, plus an anchor cross-entropy "
                     "when the class embedding is learned. Predicts by integrating the ODE "
                     f"dz/dt = v(z, x, t) from z_0 ~ N(0, I) ({steps.get('noprop-fm')}), then "
                     + ("the classifier on z_1." if fm_readout == "classifier" else
                        "the class whose embedding is nearest to z_1."),
        "backprop": f"the same T = {cfg.num_blocks} blocks and classifier, chained and trained "
                    "end to end on the classifier's cross-entropy. Predicts by running the chain "
                    "from z_0, then the classifier on z_T.",
    }
    lines = []
    for m, s in runs.items():
        seconds = s.get("eval_seconds_per_1000")
        timing = "" if seconds is None else f" Prediction: {seconds:.2f} s per 1000 test images."
        name = m if display_name(m) == m else f"{m} ({display_name(m)})"
        lines.append(f"- {name}: {texts.get(m, 'no description.')}{timing}")
    return lines


def _image_config_line(cfg, methods: list[str], config_name: str) -> str:
    """The config's fields that matter to the methods run, in one bullet."""
    parts = []
    if "noprop" in methods or BASELINE in methods:
        parts.append(f"T={cfg.num_blocks}")
    parts.append(f"{cfg.embedding} embedding")
    if "noprop" in methods:
        parts.append(f"block schedule {cfg.block_schedule} (NoProp-DT)")
    steps, solver = getattr(cfg, "inference_steps", None), getattr(cfg, "ode_solver", None)
    if steps is not None and {"noprop-ct", "noprop-fm"} & set(methods):
        parts.append(f"inference_steps {steps}")
    if solver is not None and "noprop-fm" in methods:
        parts.append(f"ode_solver {solver}")
    parts += [f"{cfg.epochs} epochs", f"batch {cfg.batch_size}", f"lr {cfg.lr}", f"seed {cfg.seed}"]
    return f"- config: {config_name}; " + ", ".join(parts)


def _image_sections(cfg, data, runs, histories, config_name: str) -> tuple[list, list]:
    first, methods = next(iter(runs.values())), list(runs)
    about = [f"# {' vs '.join(display_name(m) for m in methods)} on {cfg.dataset}", "",
             f"- dataset: {cfg.dataset} ({first['data_source']})",
             _image_config_line(cfg, methods, config_name),
             f"- device: {first['device']}"]
    chains = " and ".join(display_name(m) for m in methods if m in ("noprop", "noprop-ct"))
    accuracy = "Test accuracy is measured after the last epoch" + (
        f"; the Eq. 3 chain ({chains}) uses {cfg.inference} inference." if chains else ".")
    if "noprop" in runs:
        accuracy += " With the sequential block schedule an epoch of NoProp-DT is T passes."
    body = [accuracy, "",
            "## What each method trains on and how it predicts", "",
            *method_lines(cfg, runs), "",
            "## Per epoch", "",
            "The losses are each method's own objective (above) and are not comparable in value.",
            "", epochs_markdown(histories), "",
            "Plots: loss.png, accuracy.png, time.png, memory.png."]
    return about, body


READOUT_WORDS = {"classifier": "p(y | z_T), the classifier on the chain's last latent",
                 "last": "the last block's softmax over the vocabulary, given z_{T-1}",
                 "blocks": "the mean of the T blocks' softmaxes over the vocabulary, block t's "
                           "given z_{t-1}",
                 "first": "the first block's softmax over the vocabulary, given z_0 (pure noise)",
                 "fitted": "the T blocks' softmaxes (block t's given z_{t-1}) and p(y | z_T) "
                           "mixed with weights fitted on held-back train tokens"}


def estimator_of(runs: dict) -> str:
    """NoProp's `val_estimator` from its summary, or "-" where no NoProp run is there."""
    return next((s["val_estimator"] for s in runs.values() if s.get("val_estimator")), "-")


def _lm_sections(cfg, data, runs, histories, config_name: str) -> tuple[list, list]:
    first = next(iter(runs.values()))
    about = [f"# NoProp-LM vs a backprop GPT on {data_name(cfg)}", "",
             f"- data: {data.source}",
             f"- tokenizer: {data.tokenizer}, vocabulary {data.vocab_size}",
             f"- config: {config_name}; T={cfg.num_blocks} blocks of {cfg.layers_per_block} "
             f"layer(s) (the GPT: {cfg.num_blocks * cfg.layers_per_block} layers), width "
             f"{cfg.width}, {cfg.heads} heads, embed_dim {cfg.embed_dim} ({cfg.embed_init} "
             f"embeddings, NoProp), seq_len {cfg.seq_len}, batch {cfg.batch_size}, "
             f"{cfg.max_steps} steps, lr {cfg.lr}, seed {cfg.seed}",
             f"- evaluation: every {cfg.eval_every} steps on the first {first['val_tokens']:,} val "
             f"tokens; NoProp: {estimator_of(runs)}",
             f"- device: {first['device']}; {first['ops']} ops, {first['precision']}"]
    body = ["The val loss is -log of the model's probability of the next token, in nats per token, "
            "on the same val tokens for both methods. For NoProp-LM that probability is the mean "
            f"over K={cfg.eval_chains} chains run by Eq. 3 ({cfg.inference}) of "
            f"{READOUT_WORDS[cfg.readout]}; \"one chain\" is the same with the first chain alone. "
            "For the GPT it is its cross-entropy. The unigram entropy is the loss of a model that "
            "knows only those tokens' frequencies.", "",
            "## Validation loss at equal tokens seen", "",
            equal_tokens_markdown(histories), "",
            "Plot: val_loss.png."]
    return about, body


def write_report(cfg, data, runs: dict, histories: dict, out_dir: Path, config_name: str,
                 command: str) -> Path:
    """A comparison's charts and OUT/report.md (data, config, device, torch version, command; one
    row per method; the per-epoch or equal-tokens table); returns the report's path."""
    import torch  # for its version only; the module stays light for --help

    write_plots(runs, histories, out_dir, cfg.data_dir)
    sections = _lm_sections if cfg.task == "lm" else _image_sections
    about, body = sections(cfg, data, runs, histories, config_name)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    body[-1] += " Each method's run: " + ", ".join(f"{m}/" for m in runs) + "."
    text = "\n".join([*about, f"- torch: {torch.__version__}", f"- command: `{command}`",
                      f"- date: {date}", "", "## Results", "", results_markdown(runs, cfg.task),
                      "", *body, ""])
    path = out_dir / "report.md"
    path.write_text(text)
    return path
