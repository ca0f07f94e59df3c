"""The closing lines of a language-model run: how to read its numbers.

A validation loss alone says little to someone new to it, so a run ends by saying what a good number
is (lower is better; the unigram entropy of the same val tokens is what counting token frequencies
scores; what a GPT of the same width and depth reaches, where a comparison of the same shape has
measured it), what the printed `train loss` is (for NoProp-LM its objective, not a cross-entropy,
so not comparable with the val loss), and that the samples of a small model read as gibberish.

A GPT's figure is never assumed: it comes from this run (when it is the GPT), or from the newest
`summary.json` of a `compare --task lm` report under `reports/` (compare's default folder) whose
GPT has the same data, width, depth, heads, context and val tokens; otherwise the lines give the
command that measures it.
"""
import json
import shlex
from pathlib import Path

REPORTS = Path("reports")  # where `python -m noprop_fast.compare --task lm` writes by default
# what must agree for a comparison's GPT to be "a GPT of the same size on the same tokens"
SAME_SHAPE = ("data_dir", "num_blocks", "layers_per_block", "width", "heads", "seq_len")
# below this many tokens seen, a model of this engine's sizes does not write readable text yet
FEW_TOKENS = 100_000_000


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
    if cfg.method == "backprop":
        return {"val_loss": summary["val_loss"], "tokens_seen": summary["tokens_seen"],
                "source": "this run"}
    found = []
    for path in Path(reports).glob("compare-lm-*/summary.json"):
        try:
            report = json.loads(path.read_text())
            config, gpt = report["config"], report["runs"]["backprop"]
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
        f"reading the val loss: lower is better. A model that knows only how often each token "
        f"occurs scores the unigram entropy of these val tokens, {entropy:.4f} nats/token; this run "
        + (f"is {gap:.4f} below it." if gap > 0 else
           f"is {-gap:.4f} above it, not yet better than counting tokens.")]
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
        lines.append("train loss (in the lines above) is the NoProp objective: the blocks' "
                     "SNR-weighted denoising errors, plus the classifier's cross-entropy on a noisy "
                     "copy of the true token's embedding, plus a KL term. It is not a cross-entropy "
                     "of predicted tokens and is not comparable with the val loss.")
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
