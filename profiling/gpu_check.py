"""The one command to run when a GPU is present: tests, kernel times, benchmarks, an Nsight capture.

    profiling/gpu_check.sh [--out DIR] [--export DIR] [--budget SECONDS] [--sections a,b]
    profiling/gpu_check.sh --dry-run      # any machine: every import and command line, in seconds

From a fresh copy of the repository, installing nothing (the package is found through PYTHONPATH;
noprop_fast/__init__.py maps kernels/ and csrc/), it runs these sections in this order, each in its
own process group under its own time limit (a budget, capped by what is left of --budget):

    env            device, driver, CUDA, python, torch, triton, numpy; nvidia-smi; the git commit
    tests          pytest -m gpu: captured against uncaptured CUDA graphs bitwise, every kernel
                   against its reference (bf16 included)
    kernels        each Triton kernel of a bf16 step at the static report's mnist, cifar10 and
                   fineweb shapes, timed, against the static report's roofline (gpu_kernel_times.py)
    bench-mnist    bench.py at the MNIST config: the five paths' images/s, memory per method
    bench-fineweb  bench.py at the FineWeb config: the five paths' tokens/s, memory per method
    nsys           one Nsight Systems capture of a short training run (digits, fused, bf16) with the
                   NVTX ranges, and `nsys stats` of it, where an nsys is found

A section that fails or runs out of time is reported and the next one runs. report.md and
results.json are rewritten after every section, so a run that is killed keeps what it finished.
Everything lands in --out (default profiling/results/gpu-<device>-<date>/); with --export DIR (or
$OUT set) each section also refreshes DIR/<folder>/ with report.md, results.json and one
<folder>.tar.gz of the whole folder: three files, whatever the run produced.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the repository: run from a checkout without installing
sys.path.insert(0, str(HERE))

import gpu_check_report  # noqa: E402

# (name, time limit in seconds: a budget, not a measurement); the most valuable first:
# correctness, then the kernels' speed, then the steps' throughput, then the timeline
SECTIONS = [("env", 15), ("tests", 135), ("kernels", 80), ("bench-mnist", 65),
            ("bench-fineweb", 120), ("nsys", 45)]
BUDGET = 470          # seconds for the whole run: the limits above plus RESERVE, under 8 minutes
RESERVE = 10          # seconds kept back at the end for the report and the export
BENCH = {  # bench.py's sections, each config's own precision, rounds that fit the limits above
    # MNIST: fp32, so that all five paths run (the separate-modules loop is fp32 only)
    "bench-mnist": ["--sections", "step,methods-memory", "--precision", "fp32", "--rounds", "3",
                    "--steps-per-round", "10", "--warmup", "3"],
    # FineWeb: bf16 as its config; the reference's [T, N*L, V] logits are half of fp32's
    "bench-fineweb": ["--sections", "lm,lm-memory", "--precision", "bf16", "--rounds", "2",
                      "--steps-per-round", "3", "--warmup", "2"],
}
TRAIN = ["-m", "noprop_fast.train", "--config", "digits", "--fused", "--precision", "bf16",
         "--cuda-graphs", "off", "--epochs", "1", "--no-progress", "--device", "cuda"]
NSYS_PLACES = ["/opt/nvidia/nsight-systems/*/bin/nsys", "/opt/nvidia/nsight-systems*/bin/nsys",
               "/usr/local/cuda*/bin/nsys", "/usr/local/cuda*/nsight-systems*/bin/nsys",
               "/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys"]


def run_command(cmd, log: Path, timeout: float, env=None, cwd=ROOT) -> dict:
    """Run cmd in its own process group, output appended to log; on timeout the group is ended."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as sink:
        sink.write(f"$ {shlex.join(map(str, cmd))}\n")
        sink.flush()
        try:
            proc = subprocess.Popen(list(map(str, cmd)), stdout=sink, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True)
        except OSError as err:
            sink.write(f"could not start: {err}\n")
            return {"rc": None, "seconds": 0.0, "timed_out": False, "error": str(err)}
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        seconds = time.perf_counter() - start
        sink.write(f"[exit {rc}{', stopped at the time limit' if timed_out else ''}, {seconds:.1f} s]\n")
    return {"rc": rc, "seconds": seconds, "timed_out": timed_out}


def tail(path: Path, lines=12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def find_nsys() -> list[str]:
    import glob
    found = [shutil.which("nsys")] + sorted(p for pattern in NSYS_PLACES for p in glob.glob(pattern))
    return list(dict.fromkeys(p for p in found if p and os.access(p, os.X_OK)))


def has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------------
# The sections: each returns its record (status, detail); main() reports one that raises

def section_env(ctx) -> dict:
    info = gpu_check_report.versions()
    smi = shutil.which("nvidia-smi")
    log = ctx.out / "logs" / "env.log"
    if smi and not ctx.dry:
        run_command([smi], log, 20)
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                            "clocks.max.sm,temperature.gpu,power.draw", "--format=csv"],
                           capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    else:
        info["nvidia_smi"] = "not run (dry run)" if ctx.dry else "not found"
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    info["commit"] = (git.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
                      if git.returncode == 0 else "unknown (not a git checkout)")
    # the engine must be this copy's, found through PYTHONPATH, not an installed one
    import noprop_fast
    import noprop_fast.kernels
    info["engine"] = {m.__name__: m.__file__ for m in (noprop_fast, noprop_fast.kernels)}
    foreign = [f for f in info["engine"].values() if not Path(f).resolve().is_relative_to(ROOT)]
    ctx.results["env"] = info
    problem = (f"the engine imported from outside {ROOT}: {', '.join(foreign)}" if foreign else
               None if ctx.dry or info.get("cuda_device") not in (None, "none") else "no CUDA device")
    return {"status": "failed" if problem else "ok (dry run)" if ctx.dry else "passed",
            "detail": problem or f"{info.get('cuda_device')}, driver {info.get('driver', '?')}, "
                                 f"engine from {ROOT}"}


def tests_command(ctx) -> list:
    cmd = [ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "-rfE",
           "--continue-on-collection-errors", "--junitxml", str(ctx.out / "tests.xml")]
    if has_module("pytest_timeout"):  # a hanging test ends alone, not with the section
        cmd += ["--timeout", "120"]
    if has_module("xdist"):  # 16 cores: Triton's compilation dominates, the workers share its cache
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    return cmd + ["tests"]


def section_tests(ctx) -> dict:
    log = ctx.out / "logs" / "tests.log"
    if ctx.dry:  # the same command line, collecting only; the kernel tests collect only on a GPU
        # or under the interpreter, so their files are collected once more under it
        runs = [(tests_command(ctx)[:-1] + ["--collect-only", "-q", "tests"], {}),
                ([ctx.python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                  "tests/kernels"], {"TRITON_INTERPRET": "1"})]
        collected = []
        for cmd, extra in runs:
            r = run_command(cmd, log, ctx.limit, child_env(extra))
            if r["rc"] != 0:
                return {"status": "failed", "detail": f"collection failed: {tail(log, 3)}"}
            collected.append(gpu_check_report.last_line(log))
        return {"status": "ok (dry run)", "detail": "gpu-marked: {}; tests/kernels: {}".format(*collected)}
    r = run_command(tests_command(ctx), log, ctx.limit, child_env())
    summary = gpu_check_report.pytest_summary(log)
    ctx.results["tests"] = summary
    passed = r["rc"] == 0 and summary["counts"].get("passed", 0) > 0
    return {"status": "timed out" if r["timed_out"] else "passed" if passed else "failed",
            "detail": summary["line"]}


def section_kernels(ctx) -> dict:
    log, jsonl = ctx.out / "logs" / "kernels.log", ctx.out / "kernels.jsonl"
    script = [ctx.python, str(HERE / "gpu_kernel_times.py")]
    if ctx.dry:  # in this process: shapes, inputs and names of every row (no GPU)
        import gpu_kernel_times
        rc = gpu_kernel_times.dry_run(gpu_kernel_times.CONFIGS)
        return {"status": "ok (dry run)" if rc == 0 else "failed",
                "detail": "every row's shapes, inputs and kernel names" if rc == 0 else
                "see the problems printed above"}
    jsonl.unlink(missing_ok=True)
    r = run_command(script + ["--out", jsonl, "--iters", "10"], log, ctx.limit, child_env())
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    ctx.results["kernels"] = rows
    timed = sum(1 for x in rows if x["status"] == "ok")
    status = "timed out" if r["timed_out"] else "passed" if r["rc"] == 0 and timed else "failed"
    return {"status": status, "detail": f"{timed} of {len(rows)} kernel rows timed" + (
        f"; {gpu_check_report.last_line(log)}" if r["rc"] not in (0, None) and not r["timed_out"] else "")}


def section_bench(ctx, name) -> dict:
    log, out = ctx.out / "logs" / f"{name}.log", ctx.out / name
    args = ["--device", "cuda", *BENCH[name], "--out", str(out)]
    if ctx.dry:  # bench.py's own argument parsing of exactly these options, in this process
        import bench
        parsed = bench.parse_args(args)
        return {"status": "ok (dry run)", "detail": f"bench.py {shlex.join(args)}: sections "
                f"{','.join(parsed.sections)}"}
    r = run_command([ctx.python, str(HERE / "bench.py"), *args], log, ctx.limit, child_env())
    summary = gpu_check_report.bench_summary(out / "results.json")
    ctx.results[name] = summary
    ok = r["rc"] == 0 and summary is not None
    return {"status": "timed out" if r["timed_out"] else "passed" if ok else "failed",
            "detail": "; ".join(summary["problems"]) if ok and summary["problems"] else
            ("all paths measured" if ok else gpu_check_report.last_line(log))}


def section_nsys(ctx) -> dict:
    log, folder = ctx.out / "logs" / "nsys.log", ctx.out / "nsys"
    found = find_nsys()
    ctx.results["nsys"] = {"found": found}
    train_out = "/tmp/unused" if ctx.dry else tempfile.mkdtemp(prefix="gpu-check-train-")
    train = [ctx.python, *TRAIN, "--out", train_out]
    if ctx.dry:  # the training command's arguments, as the CLI reads them, in this process
        from noprop_fast import train as train_cli
        cfg = train_cli.config_from_args(train_cli.parse_args(train[3:]))
        return {"status": "ok (dry run)", "detail": f"nsys: {found[0] if found else 'not found'}; "
                f"training: {type(cfg).__name__} {cfg.dataset}, {cfg.epochs} epoch"}
    if not found:
        return {"status": "skipped", "detail": "no nsys on PATH or in the usual install folders"}
    folder.mkdir(parents=True, exist_ok=True)
    nsys, rep = found[0], folder / "train"
    # no CPU sampling: it needs perf events, which a virtual machine may not have
    r = run_command([nsys, "profile", "--trace=cuda,nvtx,osrt", "--sample=none", "--cpuctxsw=none",
                     "--force-overwrite=true", "-o", rep, *train], log, ctx.limit - 15,
                    child_env({"NOPROP_FAST_NVTX": "1"}))
    shutil.rmtree(train_out, ignore_errors=True)
    raw = sorted(folder.glob("train*.qdstrm"))
    importers = sorted(Path(nsys).resolve().parent.parent.glob("*/QdstrmImporter"))
    if not (folder / "train.nsys-rep").exists() and raw and importers:  # convert it ourselves
        run_command([importers[0], "-i", raw[0]], log, 20)
    reports = sorted(folder.glob("train*.nsys-rep")) or raw
    if not reports or reports[0].suffix != ".nsys-rep":
        what = f"only {reports[0].name} (not converted to a report)" if reports else "no capture"
        return {"status": "timed out" if r["timed_out"] else "failed", "detail": f"{nsys}: {what}"}
    stats = folder / "stats.txt"
    s = run_command([nsys, "stats", "--report", "nvtx_sum,cuda_gpu_kern_sum", reports[0]], stats, 15)
    if s["rc"] != 0:  # the report names of older versions
        s = run_command([nsys, "stats", "--report", "nvtxsum,gpukernsum", reports[0]], stats, 15)
    ranges = gpu_check_report.nvtx_ranges(stats)
    ctx.results["nsys"].update(report=str(reports[0].relative_to(ctx.out)), nvtx_ranges=ranges,
                               stats_rc=s["rc"])
    return {"status": "passed" if r["rc"] == 0 and ranges else "failed",
            "detail": f"{reports[0].name}; NVTX ranges seen: {', '.join(ranges) or 'none'}"
                      + ("" if s["rc"] == 0 else "; nsys stats failed")}


RUNNERS = {"env": section_env, "tests": section_tests, "kernels": section_kernels,
           "bench-mnist": lambda ctx: section_bench(ctx, "bench-mnist"),
           "bench-fineweb": lambda ctx: section_bench(ctx, "bench-fineweb"), "nsys": section_nsys}


# ------------------------------------------------------------------------------------------------
# The run

class Context:
    def __init__(self, args, out: Path):
        self.dry, self.out, self.python = args.dry_run, out, args.python
        self.limit = 0.0
        self.results = {}


def default_out(dry: bool) -> Path:
    today = datetime.date.today().isoformat()
    if dry:
        return Path(tempfile.mkdtemp(prefix=f"gpu-check-dry-run-{today}-"))
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    return HERE / "results" / f"gpu-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}-{today}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="profiling/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results folder [default profiling/results/gpu-<device>-<date>; "
                   "dry run: a temporary folder]")
    p.add_argument("--export", help="also copy report.md, results.json and a tarball of the folder "
                   "into EXPORT/<folder>/ after every section [default $OUT when set]")
    p.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for the whole run [{BUDGET}]")
    p.add_argument("--sections", default=",".join(n for n, _ in SECTIONS),
                   help="comma-separated subset, run in the fixed order [all]")
    p.add_argument("--python", default=sys.executable, help="the interpreter for every child")
    p.add_argument("--dry-run", action="store_true", help="check every import and command line "
                   "without a GPU; exit 1 if any is broken")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(RUNNERS)
    if unknown or not args.sections:
        p.error(f"--sections: {','.join(sorted(unknown)) or 'none given'}; choose from "
                f"{','.join(RUNNERS)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out) if args.out else default_out(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    dest = args.export or (os.environ.get("OUT") if not args.dry_run else None)
    if dest and out.resolve().is_relative_to(Path(dest).resolve()):  # already there, whole
        print(f"[gpu_check] --out is inside {dest}: no export (the folder itself is there)",
              file=sys.stderr)
        dest = None
    ctx = Context(args, out)
    entry = os.environ.get("GPU_CHECK_ENTRY", "python profiling/gpu_check.py")
    run = {"command": shlex.join([*entry.split(), *argv]), "dry_run": args.dry_run,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "budget_seconds": args.budget, "sections": {}}
    ctx.results["run"] = run
    for name, limit in SECTIONS:
        if name not in args.sections:
            continue
        left = args.budget - (time.perf_counter() - start) - RESERVE
        ctx.limit = min(limit, left)
        record = {"limit_seconds": round(ctx.limit, 1)}
        if ctx.limit < 15:
            record.update(status="skipped", detail=f"out of time ({left:.0f} s of the budget left)")
        else:
            print(f"[gpu_check] {name}: up to {ctx.limit:.0f} s", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                record.update(RUNNERS[name](ctx))
            except (Exception, SystemExit) as err:  # a broken section is reported; the rest run
                record.update(status="failed", detail=f"{type(err).__name__}: {err}")
            record["seconds"] = round(time.perf_counter() - t0, 1)
        run["sections"][name] = record
        print(f"[gpu_check] {name}: {record['status']} ({record.get('detail', '')[:200]})",
              file=sys.stderr, flush=True)
        run["seconds"] = round(time.perf_counter() - start, 1)
        gpu_check_report.write(ctx.results, out)
        if dest:
            try:
                run["left_out_of_export"] = gpu_check_report.export(out, Path(dest))
            except OSError as err:  # the results stay in --out
                print(f"[gpu_check] export to {dest} failed: {err}", file=sys.stderr)
    if dest and run.get("left_out_of_export"):  # name them in the exported report
        gpu_check_report.write(ctx.results, out)
        gpu_check_report.export(out, Path(dest))
    failed = [n for n, r in run["sections"].items() if r["status"] in ("failed", "timed out")]
    print(f"[gpu_check] {'dry run ' if args.dry_run else ''}done in {run['seconds']:.0f} s: "
          f"{out / 'report.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
