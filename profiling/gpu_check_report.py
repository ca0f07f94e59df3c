"""gpu_check.py's records and report: versions, the pytest, bench and nsys summaries, report.md,
and the export of the folder."""
import importlib
import json
import platform
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

EXPORT_LIMIT = 15 * 2 ** 20  # the tarball's size limit; larger files are left out of it

TITLES = {"env": "Device and versions", "tests": "GPU tests (pytest -m gpu)",
          "kernels": "Triton kernels against the static report's roofline",
          "bench-mnist": "Benchmark at the MNIST config", "bench-fineweb": "Benchmark at the FineWeb config",
          "nsys": "Nsight Systems capture"}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # absent, or broken on import
        return f"not available ({type(err).__name__})"


def versions() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "triton", "numpy", "pytest", "hypothesis", "xdist", "nvtx", "datasets"):
        info[module] = _version(module)
    try:
        import torch
        info["cuda_runtime"] = torch.version.cuda or "none (CPU build)"
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(cuda_device=p.name, capability=f"{p.major}.{p.minor}",
                        multiprocessors=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2 ** 30, 1),
                        cudnn=torch.backends.cudnn.version())
        else:
            info["cuda_device"] = "none"
    except Exception as err:
        info["cuda_device"] = f"none (torch: {type(err).__name__}: {err})"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        info["driver"] = q.stdout.strip() or "unknown"
    return info


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] \
        if log.exists() else []
    line = lines[-2] if len(lines) > 1 and lines[-1].startswith("[exit") else (lines[-1] if lines else "")
    return line.strip("= ")


def pytest_summary(log: Path) -> dict:
    """Counts from pytest's closing line; where there is none (stopped), from the -v lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    closing = re.findall(r"^=+ (.*\bin [\d.]+s.*?) =+$", text, re.M)
    counts, line = {}, ""
    if closing:
        line = closing[-1]
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", line):
            counts["error" if what.startswith("error") else what] = int(n)
    else:
        for what in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            counts[what.lower()] = len(re.findall(rf"::\S+ {what}\b|\b{what} \S+::", text))
        line = "stopped before the end; so far " + ", ".join(f"{v} {k}" for k, v in counts.items())
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
                        + re.findall(r"\] (?:FAILED|ERROR) (\S+::\S+)", text)
                        + re.findall(r"^(\S+::\S+) (?:FAILED|ERROR)\b", text, re.M)))
    return {"line": line, "counts": counts, "failed": failed}


def bench_summary(path: Path):
    """Per task: each path's median throughput, ratio to the reference and status; memory per
    method; and the problems (paths that did not run), from bench.py's results.json."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    summary, problems = {"header": data.get("header", {})}, []
    for task in ("step", "lm"):
        if task in data:
            paths = {}
            for name, p in data[task].get("paths", {}).items():
                paths[name] = {k: p.get(k) for k in ("status", "median", "ratio", "first_step_seconds")}
                if p.get("status") != "ok" and p.get("status") != "CUDA only":
                    problems.append(f"{task} {name}: {str(p.get('status'))[:120]}")
            summary[task] = {"unit": data[task].get("unit"), "config": data[task].get("config"),
                             "paths": paths}
    for memory in ("methods-memory", "lm-memory"):
        if memory in data:
            summary[memory] = {k: data[memory].get(k) for k in ("kind", "bytes", "ratios")}
    summary["problems"] = problems
    return summary


def nvtx_ranges(stats: Path) -> list[str]:
    """The engine's phase names found in the NVTX part of `nsys stats` output."""
    from noprop_fast.nvtx_ranges import PHASES
    text = stats.read_text(errors="replace") if stats.exists() else ""
    start = re.search(r"\(nvtx_?sum\)", text)  # the heading, not the command line
    end = re.search(r"\((cuda_gpu_kern_sum|gpukernsum)\)", text[start.end():]) if start else None
    part = text[start.end():start.end() + end.start()] if end else text[start.end():] if start else ""
    rows = [line for line in part.splitlines() if re.match(r"\s*[\d.,]+\s", line)]  # table rows
    return [p for p in PHASES if any(re.search(rf"(^|[\s:]){p}(\s|$)", row) for row in rows)]


# ------------------------------------------------------------------------------------------------
# report.md

def _g(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def kernel_tables(rows: list) -> list[str]:
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        ok = [r for r in mine if r["status"] == "ok"]
        out += [f"### {config}", "", "| kernel | layer | calls | measured us | roofline us | bound | "
                "TFLOP/s | GB/s | of roofline | status |", "|" + "---|" * 10]
        for r in mine:
            out.append(f"| `{r['kernel']}` | {r['layer']} | {r['count']} | {_g(r.get('measured_us'))} | "
                       f"{_g(r['roofline_us'])} | {r['bound']} | {_g(r.get('tflops'))} | "
                       f"{_g(r.get('gbs'), '.4g')} | {_g(r.get('fraction'), '.2f')} | {r['status']} |")
        measured = sum(r["count"] * r["measured_us"] for r in ok)
        roof = sum(r["count"] * r["roofline_us"] for r in ok)
        out += ["", f"Kernel time of one step ({len(ok)} of {len(mine)} rows timed, each x its calls): "
                f"{measured / 1e3:.4g} ms measured against {roof / 1e3:.4g} ms of roofline"
                + (f" ({roof / measured:.2f} of the roofline)." if measured else "."), ""]
    return out


def bench_tables(summary: dict) -> list[str]:
    out = []
    for task in ("step", "lm"):
        if task in summary:
            t = summary[task]
            out += [f"{task}: `{json.dumps(t['config'])}`", "", f"| path | {t['unit']} (median) | "
                    "vs reference | first warm-up step s | status |", "|---|---|---|---|---|"]
            for name, p in t["paths"].items():
                out.append(f"| {name} | {_g(p['median'], '.4g')} | {_g(p['ratio'])} | "
                           f"{_g(p['first_step_seconds'])} | {p['status']} |")
            out.append("")
    for memory in ("methods-memory", "lm-memory"):
        if memory in summary and summary[memory].get("bytes"):
            m = summary[memory]
            out += [f"{memory} ({m['kind']}): " + ", ".join(
                f"{k} {v / 2 ** 20:.1f} MiB" for k, v in m["bytes"].items()) + "; ratios " + ", ".join(
                f"{k} {_g(v)}" for k, v in (m.get("ratios") or {}).items()), ""]
    return out


def render(results: dict) -> str:
    run, env = results["run"], results.get("env", {})
    title = "GPU check (dry run: no GPU used, commands checked only)" if run["dry_run"] else "GPU check"
    lines = [f"# {title}: {env.get('cuda_device', '?')}", "",
             f"Command: `{run['command']}`, {run['date']}; commit {env.get('commit', '?')}.",
             f"Time: {run.get('seconds', 0):.0f} s of a {run['budget_seconds']:.0f} s budget. Each "
             "section's limit is a budget set in advance, not a measurement.", "",
             "| section | status | seconds | limit s | detail |", "|---|---|---|---|---|"]
    for name, r in run["sections"].items():
        detail = str(r.get("detail", "")).replace("\n", " ").replace("|", "/")[:300]
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {r['limit_seconds']} "
                     f"| {detail} |")
    if run.get("left_out_of_export"):
        lines.append(f"Left out of the exported archive (too large): {', '.join(run['left_out_of_export'])}.")
    lines.append("")
    if env:
        lines += [f"## {TITLES['env']}", "", ", ".join(f"{k}: {v}" for k, v in env.items()
                                                       if k not in ("nvidia_smi", "commit")), ""]
        if env.get("nvidia_smi"):
            lines += ["```", env["nvidia_smi"], "```", ""]
    if "tests" in results:
        t = results["tests"]
        lines += [f"## {TITLES['tests']}", "", t["line"], "", "Full log: logs/tests.log.", ""]
        lines += [f"- {name}" for name in t["failed"][:40]] + ([""] if t["failed"] else [])
    if results.get("kernels"):
        lines += [f"## {TITLES['kernels']}", "", "Each row: the median device time of the kernel "
                  "(torch.profiler) over 10 forward + backward calls of its fused op at the static "
                  "report's bf16 shapes; the roofline, FLOPs and bytes are profiling/static_report.py's "
                  "(H100 SXM peaks); 'of roofline' = roofline time / measured time. The tile the "
                  "autotuner picks may differ from the static report's estimate.", ""]
        lines += kernel_tables(results["kernels"])
    for name in ("bench-mnist", "bench-fineweb"):
        if results.get(name):
            lines += [f"## {TITLES[name]}", "", f"bench.py's own report: {name}/report.md.", ""]
            lines += bench_tables(results[name])
    if "nsys" in results:
        n = results["nsys"]
        lines += [f"## {TITLES['nsys']}", "", f"nsys found: {', '.join(n['found']) or 'none'}."]
        if n.get("report"):
            lines += [f"Capture: {n['report']}; `nsys stats` output: nsys/stats.txt; NVTX ranges "
                      f"seen: {', '.join(n.get('nvtx_ranges', [])) or 'none'}."]
        lines.append("")
    return "\n".join(lines)


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.md").write_text(render(results))


def export(out: Path, dest: Path) -> list[str]:
    """dest/<folder>/: report.md, results.json and <folder>.tar.gz of the whole folder, less the
    files over half the size limit (and all over 1 MiB if the archive would still pass it);
    returns the files left out."""
    target = dest / out.name
    target.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.json"):
        if (out / name).exists():
            shutil.copyfile(out / name, target / name)
    archive, files = target / f"{out.name}.tar.gz", sorted(p for p in out.rglob("*") if p.is_file())
    for largest in (EXPORT_LIMIT // 2, 2 ** 20):
        kept = [p for p in files if p.stat().st_size <= largest]
        with tarfile.open(archive, "w:gz") as tar:
            for path in kept:
                tar.add(path, arcname=f"{out.name}/{path.relative_to(out)}")
        if archive.stat().st_size <= EXPORT_LIMIT:
            break
    return [str(p.relative_to(out)) for p in files if p not in kept]
