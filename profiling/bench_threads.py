"""CPU thread rules, idle and with other cores busy: an image epoch of the default job and a short
language-model run under each rule, each in a fresh process (the OpenMP runtime reads its wait
policy once, when torch loads it).

    python profiling/bench_threads.py --out runs/bench-threads        # the measurement
    python profiling/bench_threads.py --tiny --out /tmp/bt            # smoke run, figures say nothing

Rules (the engine's is `passive`, what a run with no thread options does; see noprop_fast/threads.py):

  spin     one thread per core, waiting threads spin a while first (the OpenMP runtime's default,
           GOMP_SPINCOUNT=300000): what runs did before the rule
  passive  one thread per core, waiting threads sleep (OMP_WAIT_POLICY=PASSIVE): the engine's rule
  spin-1k  one thread per core, a short spin (GOMP_SPINCOUNT=1000)
  one      one thread (--threads 1)
  load     cores minus the cores busy at start-up (/proc/stat sampled over 0.5 s), spinning waits

Conditions: `idle` (nothing started here; the load average is recorded, run it on a quiet
machine) and `busy` (--busy-cores processes spinning on a core each, started and stopped here,
each bounded to --busy-seconds). Image: `python -m noprop_fast.train` with the default config
(digits, T = 10, batch 64) for --epochs epochs; the figure is the last epoch's seconds (the first
pays the one-off start-up). Language: `--task lm` for --lm-steps steps, no samples, one evaluation
at the end; the figure is its tokens/s over the training steps. Writes report.md and results.json
(command, device, versions, every figure) under --out.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = ("GOMP_SPINCOUNT", "300000")  # the runtime's default spin, named so the engine keeps it
RULES = {"spin": ({SPIN[0]: SPIN[1]}, None), "passive": ({}, None),
         "spin-1k": ({"GOMP_SPINCOUNT": "1000"}, None), "one": ({}, 1),
         "load": ({SPIN[0]: SPIN[1]}, "load")}
CLEARED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SPINNER = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def busy_cores_now(seconds: float = 0.5) -> float:
    """Cores busy over `seconds` from /proc/stat's all-CPU line (user to steal, not idle/iowait)."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    share = 1 - (idle1 - idle0) / max(total1 - total0, 1)
    return share * (os.cpu_count() or 1)


def run_one(rule: str, workload: str, args, scratch: Path) -> dict:
    env_extra, threads = RULES[rule]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_extra)
    note = ""
    if threads == "load":
        busy = busy_cores_now()
        threads = max(1, (os.cpu_count() or 1) - round(busy))
        note = f"{busy:.2f} cores busy at start-up"
    out = scratch / f"{rule}-{workload}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "noprop_fast.train", "--no-progress", "--out", str(out)]
    if workload == "image":
        cmd += ["--epochs", str(args.epochs)] + (["--num-blocks", "2", "--batch-size", "256"]
                                                 if args.tiny else [])
    else:
        cmd += ["--task", "lm", "--max-steps", str(args.lm_steps), "--eval-every",
                str(args.lm_steps), "--eval-tokens", "4096", "--sample-tokens", "0"]
        cmd += ["--width", "32", "--heads", "2", "--num-blocks", "2"] if args.tiny else []
    if threads is not None:
        cmd += ["--threads", str(threads)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=args.run_timeout)
    wall = time.perf_counter() - start
    result = {"rule": rule, "workload": workload, "command": shlex.join(cmd[1:]), "env": env_extra,
              "load_average_before": load, "wall_seconds": wall, "note": note}
    if proc.returncode != 0:
        return {**result, "status": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result["header"] = proc.stdout.splitlines()[0]
    if workload == "image":
        result.update(status="ok", figure=records[-1]["epoch_seconds"], unit="s per epoch",
                      epoch_seconds=[r["epoch_seconds"] for r in records])
    else:
        result.update(status="ok", figure=records[-1]["tokens_per_second"], unit="tokens/s")
    return result


def start_spinners(count: int, seconds: float) -> list:
    return [subprocess.Popen([sys.executable, "-c", SPINNER.format(seconds=seconds)])
            for _ in range(count)]


def stop_spinners(spinners: list) -> None:
    for proc in spinners:
        proc.kill()
        proc.wait()


def header(argv: list[str]) -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"command": shlex.join(["python", "profiling/bench_threads.py", *argv]),
            "device": f"{cpu}, {os.cpu_count()} cores", "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(" ", "seconds"),
            "parallel_info": torch.__config__.parallel_info().splitlines()[:6]}


def render(results: dict) -> str:
    head = results["header"]
    lines = ["# CPU thread rules, idle and with other cores busy", "",
             f"- command: `{head['command']}`", f"- device: {head['device']}",
             f"- torch {head['torch']}, Python {head['python']}, {head['date']}",
             f"- busy: {head['busy_cores']} process(es) spinning; load average (1 min) before "
             "each run in the table", "",
             "| rule | workload | idle | busy | busy / idle | load avg idle, busy |", "|---|---|---:|---:|---:|---:|"]
    for rule in head["rules"]:
        for workload in head["workloads"]:
            idle, busy = (results["runs"].get(f"{rule}/{workload}/{c}") for c in ("idle", "busy"))
            cells = []
            for r in (idle, busy):
                cells.append(f"{r['figure']:.2f} {r['unit']}" if r and r["status"] == "ok"
                             else (r or {}).get("status", "-"))
            ok = idle and busy and idle["status"] == busy["status"] == "ok"
            ratio = "-" if not ok else (f"{busy['figure'] / idle['figure']:.2f}" if workload == "image"
                                        else f"{idle['figure'] / busy['figure']:.2f}")
            loads = ", ".join(f"{r['load_average_before']:.2f}" if r else "-" for r in (idle, busy))
            cells = [rule, workload, *cells, ratio, loads]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "busy / idle: how many times slower the run is with the other cores busy (image: "
              "seconds per epoch; language: tokens/s, inverted)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for report.md and results.json")
    p.add_argument("--rules", default=",".join(RULES), help=f"subset of {','.join(RULES)}")
    p.add_argument("--workloads", default="image,lm", help="subset of image,lm")
    p.add_argument("--conditions", default="idle,busy", help="subset of idle,busy")
    p.add_argument("--epochs", type=int, default=2, help="image epochs per run [default 2]")
    p.add_argument("--lm-steps", type=int, default=40, help="language steps per run [default 40]")
    p.add_argument("--busy-cores", type=int, default=1, help="spinning processes [default 1]")
    p.add_argument("--busy-seconds", type=float, default=3600,
                   help="each spinning process ends by itself after this [default 3600]")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds per run [default 900]")
    p.add_argument("--tiny", action="store_true", help="T = 2 and a tiny language model: a smoke run")
    args = p.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    if not rules or any(r not in RULES for r in rules):
        p.error(f"--rules: a subset of {','.join(RULES)}")
    workloads, conditions = args.workloads.split(","), args.conditions.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"header": {**header(argv), "rules": rules, "workloads": workloads,
                          "busy_cores": args.busy_cores}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        if "lm" in workloads:  # builds the embedded corpus once, before any clock
            run_one("one", "lm", argparse.Namespace(**{**vars(args), "lm_steps": 1}), Path(scratch))
        for condition in conditions:
            spinners = start_spinners(args.busy_cores, args.busy_seconds) if condition == "busy" else []
            try:
                time.sleep(1.0 if spinners else 0.0)
                for rule in rules:
                    for workload in workloads:
                        r = run_one(rule, workload, args, Path(scratch))
                        results["runs"][f"{rule}/{workload}/{condition}"] = {**r, "condition": condition}
                        print(f"{condition:>4} {rule:>7} {workload:>5}: "
                              f"{r.get('figure', r['status'])} {r.get('unit', '')} "
                              f"(load {r['load_average_before']:.2f})", flush=True)
            finally:
                stop_spinners(spinners)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render(results))
    print(render(results))
    print(f"written: {out / 'report.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
