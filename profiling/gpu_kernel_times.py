"""Each Triton kernel of a fused bf16 training step, measured on the GPU at the static report's
shapes, against the static report's roofline.

    python profiling/gpu_kernel_times.py --out kernels.jsonl [--configs fineweb,mnist,cifar10]
    python profiling/gpu_kernel_times.py --dry-run     # on a CPU: shapes, inputs and names only

The calls and their shapes are profiling/static_report.py's: its per-op builders (`linear_calls`,
`head_calls`, `attention_calls`, `noise_calls`, `loss_calls`) are wrapped while `image_calls` /
`lm_calls` list a config's step, so each group of rows comes with the numbers it was built from.
For each group the public fused op runs forward and backward (`torch.autograd.grad`, nothing
accumulated) on random bf16 inputs of those shapes: warm-up calls first (Triton's compilation and
block_linear's autotuning), then `--iters` calls under `torch.profiler`, whose trace gives every
kernel's device time. Each row's time is the median over the iterations of its kernel's duration;
the Triton kernels are told apart by name, and block_linear's three products (one kernel) by their
launch order (forward, dX, dW). Achieved FLOP/s and bytes/s use the static report's counts; the
fraction is roofline time / measured time (1 = at the roofline). The roofline is the static
report's (H100 SXM peaks): a memory-bound kernel on a GPU with faster memory can pass 1.

One JSON line per row, written as each group finishes, so a run that is stopped keeps what it has.
"""
import argparse
import inspect
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository: run from a checkout without installing
sys.path.insert(0, str(HERE))

import static_report as sr  # noqa: E402

CONFIGS = ("fineweb", "mnist", "cifar10")  # the most valuable first
BUILDERS = ("linear_calls", "head_calls", "attention_calls", "noise_calls", "loss_calls")
# the static report's kernel name (before "[", without the dtype) -> (kernels module, Triton function)
KERNEL_FUNCTIONS = {
    "block_linear_fwd": ("block_linear", "_batched_matmul_kernel"),
    "block_linear_dx": ("block_linear", "_batched_matmul_kernel"),
    "block_linear_dw": ("block_linear", "_batched_matmul_kernel"),
    "block_linear_bias_grad": ("block_linear", "_bias_grad_kernel"),
    "softmax_head_fwd": ("softmax_head", "_fwd"),
    "softmax_head_bwd_delta": ("softmax_head", "_bwd_delta"),
    "softmax_head_bwd_dh": ("softmax_head", "_bwd_dh"),
    "softmax_head_bwd_dk": ("softmax_head", "_bwd_dk"),
    "softmax_head_bwd_dv": ("softmax_head", "_bwd_dv"),
    "attention_fwd": ("attention", "_fwd"),
    "attention_bwd_delta": ("attention", "_bwd_delta"),
    "attention_bwd_dq": ("attention", "_bwd_dq"),
    "attention_bwd_dkdv": ("attention", "_bwd_dkdv"),
    "noise_fwd": ("noise", "_noise_fwd_kernel"),
    "noise_bwd": ("noise", "_noise_bwd_kernel"),
    "block_loss_partial": ("block_loss", "_block_loss_partial_kernel"),
    "block_loss_finish": ("block_loss", "_block_loss_finish_kernel"),
    "block_loss_bwd": ("block_loss", "_block_loss_bwd_kernel"),
}


def kernel_key(name: str) -> str:
    """`block_linear_dx_bf16[128x128x32,w8,s3]` -> `block_linear_dx`."""
    return re.sub(r"_(bf16|fp16|fp32)$", "", name.split("[")[0])


def kernel_function(call) -> str:
    key = kernel_key(call.kernel)
    if key not in KERNEL_FUNCTIONS:
        raise KeyError(f"no Triton function known for the static report's kernel {call.kernel}")
    return KERNEL_FUNCTIONS[key][1]


def step_groups(config: str):
    """[(builder, {argument: value}, [Call])] for one config's step, and the step's Calls that no
    recorded builder made (to be reported: they cannot be timed here)."""
    groups, originals = [], {name: getattr(sr, name) for name in BUILDERS}

    def recording(name, fn):
        def wrapper(*args, **kwargs):
            calls = fn(*args, **kwargs)
            bound = inspect.signature(fn).bind(*args, **kwargs)
            bound.apply_defaults()
            groups.append((name, dict(bound.arguments), calls))
            return calls
        return wrapper

    try:
        for name, fn in originals.items():
            setattr(sr, name, recording(name, fn))
        cfg = sr.load_config(config)
        calls = sr.lm_calls(cfg) if cfg.get("task") == "lm" else sr.image_calls(cfg)
    finally:
        for name, fn in originals.items():
            setattr(sr, name, fn)
    grouped = {id(c) for _, _, group in groups for c in group}
    return groups, [c for c in calls if id(c) not in grouped]


# ------------------------------------------------------------------------------------------------
# Inputs and the fused op's forward + backward for one group

def group_runner(builder: str, a: dict, device, dtype, check_only=False):
    """A function running the group's fused op forward and backward once, on fresh random inputs
    of the group's shapes; check_only: the op's input checks on those shapes (meta tensors)."""
    import torch
    from noprop_fast.ops import checks as op_checks

    def rand(*shape, grad=False, dt=dtype):
        t = torch.randn(shape, device=device, dtype=dt)
        return t.requires_grad_(grad)

    if builder == "linear_calls":
        B, N, K, M = a["B"], a["N"], a["K"], a["M"]
        x, w, b = rand(B, N, K, grad=a.get("need_dx", True)), rand(B, M, K, grad=True), rand(B, M, grad=True)
        if check_only:
            return op_checks.check_block_linear(x, w, b)
        from noprop_fast.kernels.block_linear import block_linear
        leaves, run = [t for t in (x, w, b) if t.requires_grad], lambda: block_linear(x, w, b)
    elif builder == "head_calls":
        B, N, m, D, d = a["B"], a["N"], a["m"], a["D"], a["d"]
        h, k = rand(B, N, D, grad=True), rand(B, m, D, grad=True)
        c, v = rand(B, m, grad=True), rand(m, d, grad=True)
        if check_only:
            return op_checks.check_softmax_head(h, k, c, v)
        from noprop_fast.kernels.softmax_head import softmax_head
        leaves, run = [h, k, c, v], lambda: softmax_head(h, k, c, v)
    elif builder == "attention_calls":
        q, k, v = (rand(a["Z"], a["H"], a["L"], a["Dh"], grad=True) for _ in range(3))
        if check_only:
            return op_checks.check_attention(q, k, v)
        from noprop_fast.kernels.attention import causal_attention
        leaves, run = [q, k, v], lambda: causal_attention(q, k, v)
    elif builder == "noise_calls":
        B, N, m, d = a["B"], a["N"], a["m"], a["d"]
        y = torch.randint(0, m, (N,), device=device)
        W = rand(m, d, grad=a["backward"])
        coef = [torch.rand(B, device=device, dtype=torch.float32) for _ in range(2)]
        seed, offset = (torch.zeros(1, device=device, dtype=torch.int64) for _ in range(2))
        if check_only:
            return op_checks.check_noise_injection(y, W, coef[0], coef[1], seed, offset)
        from noprop_fast.kernels.noise import noise_injection
        leaves, run = [W] if a["backward"] else [], lambda: noise_injection(y, W, *coef, seed, offset)
    elif builder == "loss_calls":
        B, N, d = a["B"], a["N"], a["d"]
        u_hat, u, w = rand(B, N, d, grad=True), rand(N, d, grad=True), rand(B, dt=torch.float32)
        if check_only:
            return op_checks.check_block_loss(u_hat, u, w)
        from noprop_fast.kernels.block_loss import block_loss
        leaves, run = [u_hat, u], lambda: block_loss(u_hat, u, w)
    else:
        raise KeyError(f"no inputs known for the static report's builder {builder}")

    def forward_backward():
        out = run()
        if leaves:
            torch.autograd.grad(out, leaves, torch.randn_like(out))
    return forward_backward


# ------------------------------------------------------------------------------------------------
# Kernel durations from a profiler trace

def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """(name, duration in us) of every GPU kernel in a chrome trace, in launch order."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    return [(e["name"], float(e["dur"])) for e in sorted(events, key=lambda e: e["ts"])]


def trace_name(name: str, functions) -> str | None:
    """The Triton function a trace's kernel name is, if any: the name itself, or (older Triton) the
    name followed by its signature's specialisation suffix, e.g. `_fwd_0d1d2de3de`."""
    if name in functions:
        return name
    match = re.fullmatch(r"(.+?)_\d[\dcde]*", name)
    return match.group(1) if match and match.group(1) in functions else None


def assign_durations(calls, events, iters):
    """Per Call: its kernel's durations over the iterations. Each iteration launches the group's
    Triton kernels in the same order; rows are matched by function name and, for a name that
    serves several rows (block_linear's products), by occurrence within the iteration."""
    names = [kernel_function(c) for c in calls]
    wanted = set(names)
    ours = [(named, d) for n, d in events for named in [trace_name(n, wanted)] if named]
    per_iter = len(names)
    if len(ours) != per_iter * iters:
        seen = sorted({n for n, _ in events})
        raise RuntimeError(f"expected {per_iter} x {iters} kernel launches named {sorted(wanted)}, "
                           f"found {len(ours)}; kernels seen: {seen[:12]}")
    durations = [[] for _ in calls]
    for i in range(iters):
        chunk = ours[i * per_iter:(i + 1) * per_iter]
        position = {}
        for name, dur in chunk:
            position.setdefault(name, []).append(dur)
        for row, name in enumerate(names):
            occurrence = sum(1 for n in names[:row] if n == name)
            durations[row].append(position[name][occurrence])
    return durations


def profile_group(forward_backward, iters: int, warmup: int):
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        forward_backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward_backward()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return kernel_events(json.loads(path.read_text()))


def row(config, call, durations_us, status="ok"):
    seconds, bound = sr.roofline(call.flops, call.nbytes)
    result = {"config": config, "op": call.op, "kernel": call.kernel, "layer": call.layer,
              "shape": call.shape, "static_config": call.config, "count": call.count,
              "flops": call.flops, "bytes": call.nbytes, "roofline_us": seconds * 1e6,
              "bound": bound, "status": status}
    if durations_us and statistics.median(durations_us) > 0:
        t = statistics.median(durations_us) * 1e-6
        result.update(measured_us=t * 1e6, samples=len(durations_us),
                      min_us=min(durations_us), max_us=max(durations_us),
                      tflops=call.flops / t / 1e12, gbs=call.nbytes / t / 1e9,
                      fraction=seconds / t)
    return result


def run(configs, out: Path, iters: int, warmup: int) -> int:
    import torch
    if not torch.cuda.is_available():
        print("gpu_kernel_times: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failures = 0
    with out.open("a") as sink:
        def emit(rows):
            sink.writelines(json.dumps(r) + "\n" for r in rows)
            sink.flush()

        for config in configs:
            groups, untimed = step_groups(config)
            emit([row(config, c, None, "not timed: no builder recorded for it") for c in untimed])
            for builder, args, calls in groups:
                start = time.perf_counter()
                try:
                    events = profile_group(group_runner(builder, args, "cuda", torch.bfloat16),
                                           iters, warmup)
                    durations = assign_durations(calls, events, iters)
                    emit([row(config, c, d) for c, d in zip(calls, durations)])
                except Exception as err:  # one group's failure is reported; the others still run
                    failures += 1
                    first = str(err).splitlines()[0][:300] if str(err) else ""
                    emit([row(config, c, None, f"failed: {type(err).__name__}: {first}") for c in calls])
                print(f"{config} {builder} {args.get('layer', '')}: {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    return 1 if failures else 0


def dry_run(configs) -> int:
    """On any machine: every group's shapes pass the op's input checks (meta tensors), every row
    names a known Triton function that its kernels module defines, and no row is left untimed."""
    import importlib
    problems, rows = [], 0
    for config in configs:
        groups, untimed = step_groups(config)
        problems += [f"{config}: {c.kernel} ({c.layer}) comes from no recorded builder" for c in untimed]
        for builder, args, calls in groups:
            try:
                group_runner(builder, args, "meta", __import__("torch").bfloat16, check_only=True)
                for call in calls:
                    module, fn = KERNEL_FUNCTIONS[kernel_key(call.kernel)]
                    if not hasattr(importlib.import_module(f"noprop_fast.kernels.{module}"), fn):
                        problems.append(f"{call.kernel}: noprop_fast.kernels.{module} has no {fn}")
                    rows += 1
            except Exception as err:
                problems.append(f"{config} {builder} {args}: {type(err).__name__}: {err}")
    for p in problems:
        print(f"gpu_kernel_times: {p}", file=sys.stderr)
    print(f"gpu_kernel_times --dry-run: {rows} kernel rows over {len(configs)} configs, "
          f"{len(problems)} problems")
    return 1 if problems or not rows else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON lines file (appended to)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--iters", type=int, default=10, help="profiled forward + backward calls per group")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (compile, autotune)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if args.dry_run:
        return dry_run(configs)
    if not args.out:
        p.error("--out is required")
    return run(configs, Path(args.out), max(1, args.iters), max(1, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
