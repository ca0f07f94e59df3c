"""`python -m noprop_fast.compare --task lm`: NoProp-LM against a backprop GPT on the same tokens.

The token shards are loaded once and the one `TokenData` is given to both trainers; both methods
run from the same config (so the same batch size, seq_len, steps and evaluation tokens), each in its
own run folder. Written into OUT:

    OUT/report.md      data, tokenizer, config, device, torch version, command; one row per method;
                       the validation loss of every evaluation, side by side at equal tokens seen
    OUT/summary.json   {"config": ..., "runs": {method: summary}, "history": {method: [evals]}}
    OUT/val_loss.png   val loss against tokens seen, one line per method, the unigram entropy dashed
    OUT/<method>/      each method's own run folder (config, metrics, checkpoint, summary)

The validation loss is comparable across the methods: both are -log of the model's probability of
the next token, in nats per token, on the same val tokens. For NoProp-LM that probability is the
mean of p(y | z_T) over K chains of Eq. 3 (`eval_chains`); for the GPT it is its softmax.
"""
import dataclasses
import datetime
import json
import shlex
import sys
from pathlib import Path

from .compare import _fmt, refuse_existing_runs, start_clean
from .config import LMConfig
from .errors import UserError

BASELINE = "backprop"  # the GPT: it has no chain, so no one-chain loss


def data_name(cfg: LMConfig) -> str:
    """What the title calls the data: the shard folder, or the embedded corpus."""
    return cfg.data_dir if cfg.data_dir is not None else "the embedded corpus (Python's docs)"


def results_markdown(runs: dict[str, dict]) -> str:
    """One row per method: final val loss, one chain's, perplexity, unigram entropy, throughput."""
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


def equal_tokens_markdown(histories: dict[str, list[dict]]) -> str:
    """One row per evaluation, keyed by tokens seen; '-' where a method has no evaluation there."""
    methods = list(histories)
    by_tokens = {m: {r["tokens_seen"]: r for r in h} for m, h in histories.items()}
    lines = ["| step | tokens seen | " + " | ".join(f"{m} val loss" for m in methods) + " |",
             "|---:|---:|" + "---:|" * len(methods)]
    for tokens in sorted({t for rows in by_tokens.values() for t in rows}):
        records = [by_tokens[m].get(tokens) for m in methods]
        steps = sorted({r["step"] for r in records if r is not None})
        cells = [_fmt(None if r is None else r["val_loss"], ".4f") for r in records]
        lines.append(f"| {'/'.join(map(str, steps))} | {tokens:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(runs: dict[str, dict], histories: dict[str, list[dict]], cfg: LMConfig,
               out_dir: Path) -> Path:
    """val_loss.png: each method's val loss against tokens seen, the unigram entropy dashed."""
    from .plots import line_chart, token_data_name

    first = next(iter(runs.values()))
    series = {m: [(r["tokens_seen"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
              for m, history in histories.items()}
    entropy, where = first["unigram_entropy"], f"{token_data_name(cfg.data_dir)}, {first['device']}"
    return line_chart(series, "tokens seen", "val loss (nats/token)", f"Validation loss: {where}",
                      out_dir / "val_loss.png", reference=(entropy, f"unigram entropy {entropy:.3f}"))


def write_report(cfg: LMConfig, data, runs: dict, histories: dict, out_dir: Path,
                 config_name: str, command: str) -> Path:
    import torch  # for its version only

    first = next(iter(runs.values()))
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    gpt_layers = cfg.num_blocks * cfg.layers_per_block
    text = "\n".join([
        f"# NoProp-LM vs a backprop GPT on {data_name(cfg)}", "",
        f"- data: {data.source}",
        f"- tokenizer: {data.tokenizer}, vocabulary {data.vocab_size}",
        f"- config: {config_name}; T={cfg.num_blocks} blocks of {cfg.layers_per_block} layer(s) "
        f"(the GPT: {gpt_layers} layers), width {cfg.width}, {cfg.heads} heads, "
        f"embed_dim {cfg.embed_dim} ({cfg.embed_init} embeddings, NoProp), seq_len {cfg.seq_len}, "
        f"batch {cfg.batch_size}, {cfg.max_steps} steps, lr {cfg.lr}, seed {cfg.seed}",
        f"- evaluation: every {cfg.eval_every} steps on the first {first['val_tokens']:,} val tokens; "
        f"NoProp with {cfg.eval_chains} chains, {cfg.inference} inference",
        f"- device: {first['device']}; {first['ops']} ops, {first['precision']}",
        f"- torch: {torch.__version__}",
        f"- command: `{command}`",
        f"- date: {date}", "",
        "## Results", "",
        results_markdown(runs), "",
        "The val loss is -log of the model's probability of the next token, in nats per token, on "
        "the same val tokens for both methods. For NoProp-LM that probability is the mean over "
        f"K={cfg.eval_chains} chains of p(y | z_T), z_T drawn by the Eq. 3 chain ({cfg.inference}); "
        "\"one chain\" is the first chain's cross-entropy alone. For the GPT it is its cross-entropy. "
        "The unigram entropy is the loss of a model that knows only those tokens' frequencies.", "",
        "## Validation loss at equal tokens seen", "",
        equal_tokens_markdown(histories), "",
        "Plot: val_loss.png. Each method's run: " + ", ".join(f"{m}/" for m in runs) + ".", ""])
    path = out_dir / "report.md"
    path.write_text(text)
    return path


def compare_lm(cfg: LMConfig, methods: list[str], out_dir, show_progress: bool = False, *,
               config_name: str = LMConfig.DEFAULT, command: str | None = None,
               overwrite: bool = False) -> dict:
    """Train every method on one copy of the token data; write report, summary and plot.

    Returns {"config", "runs": {method: LMTrainer summary}, "history": {method: [eval records]},
    "report": path of report.md}.
    """
    from .loop import Run  # imported here so that --help stays fast
    from .preflight import check_token_data
    from .tasks.language import load_token_data

    out_dir = Path(out_dir)
    if BASELINE in methods and cfg.embed_init != "learned":
        raise UserError("embed_init: the GPT baseline learns its own embeddings; compare with "
                        "embed_init learned, or --methods noprop")
    refuse_existing_runs(out_dir, methods, overwrite)
    if command is None:
        command = shlex.join(sys.argv)
    data = load_token_data(cfg.data_dir, show_progress)
    check_token_data(cfg, data)  # before the first method trains
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, histories = {}, {}
    for m in methods:
        run_cfg = dataclasses.replace(cfg, method=m, out=str(out_dir / m))
        print(f"== {m} LM on {data_name(cfg)}, run {out_dir / m}", flush=True)
        trainer = Run(run_cfg, data, out_dir / m, show_progress=show_progress)
        start_clean(out_dir / m, overwrite)
        runs[m] = trainer.fit()
        histories[m] = trainer.progress.history
    result = {"config": dataclasses.replace(cfg, out=str(out_dir)).to_dict(), "runs": runs,
              "history": histories}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    write_plot(runs, histories, cfg, out_dir)
    result["report"] = str(write_report(cfg, data, runs, histories, out_dir, config_name, command))
    return result
