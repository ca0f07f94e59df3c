"""Every NoProp-LM readout of finished runs, with stochastic and noise-free chains, K chains and
one, on the run's own val tokens (calibrated on its held-back tokens where it kept some), and
each block's softmax and the classifier alone (docs/language.md, "What limits NoProp-LM"):

    python profiling/lm_readouts.py RUN [RUN ...] --out FILE.json

Each run folder's config and checkpoint are loaded as they were trained; nothing is trained.
Prints one line per (run, inference) and writes every number to FILE.json with the command,
the device and the versions.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from noprop_fast import readouts, runs
from noprop_fast.config import LMConfig, load_config
from noprop_fast.data.shards import val_batches
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.language import LanguageTask, build_lm, validation_loss


def evaluate(run_dir: Path, inference: str, chains: int) -> dict:
    cfg = load_config(str(run_dir / "config.yaml"), LMConfig)
    data = LanguageTask.load_data(cfg, show_progress=False)
    device = torch.device("cpu")
    model = build_lm(cfg, data.vocab_size, device)
    model.load_state_dict(runs.load_checkpoint(run_dir)["model"])
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)
    task = LanguageTask(cfg, data, device)
    start = time.perf_counter()
    heldback = None if task.heldback is None else val_batches(  # the run's own held-back tokens
        task.heldback, cfg.batch_size, cfg.seq_len, device)
    val = validation_loss(model, schedule, task.val_batches(), inference == "stochastic",
                          cfg.seed, chains, heldback=heldback)
    # each component alone: blocks 1..T, then the classifier ([2, T + 1, M] at temperature 1)
    scores = readouts.Scores(torch.ones(1), keep_rows=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    for x, y in task.val_batches():
        scores.add(model, schedule, x, y, chains, inference == "stochastic", generator)
    per_component = (-scores.rows().mean(-1)).tolist()
    return {"run": str(run_dir), "inference": inference, "chains": chains,
            "val_tokens": val["val_tokens"], "readouts": val["readouts"],
            "each_component": {"chains": [round(v, 4) for v in per_component[0]],
                               "one_chain": [round(v, 4) for v in per_component[1]]},
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--inference", nargs="+", default=["stochastic", "noise-free"],
                        choices=["stochastic", "noise-free"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        for inference in args.inference:
            row = evaluate(run_dir, inference, args.chains)
            rows.append(row)
            print(run_dir.name, inference, {r: (round(v["val_loss"], 4),
                                                round(v["val_loss_one_chain"], 4),
                                                v.get("weights", v.get("temperature")))
                                            for r, v in row["readouts"].items()},
                  "each block, then the classifier:", row["each_component"], flush=True)
    args.out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "device": f"cpu ({platform.processor()}, "
        f"{torch.get_num_threads()} threads)", "torch": torch.__version__,
        "python": platform.python_version(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
