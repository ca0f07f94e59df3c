"""Section 2 of profiling/bench.py: each fused op against its reference (ops/reference.py), forward (autograd
recording, as in training) and forward + backward, at the shapes the MNIST step uses, and the head
at a language-model shape (B=1, N=1024, D=128, m=50257, d=256). CPU: torch.utils.benchmark's
blocked_autorange median; GPU: triton's do_bench median, and GB/s or TFLOP/s from the formulas in
`op_cases`. The table of shapes and what the work counts: profiling/README.md.

block_linear and softmax_head are called the way the model calls them (BlockLinear.forward,
DenoisingBlocks.denoise): the weight and bias (the head's k and c) are
`block_slice(p, ALL_BLOCKS).to(dtype)` of leaf fp32 nn.Parameters [T, out, in] / [T, out] (all
blocks: the parameter itself, no view), taken inside the timed call; x (h and v)
are leaves requiring grad. Their backward is `.backward()` into `.grad`, every leaf's `.grad` set to
None before each call as the optimiser's zero_grad(set_to_none=True) does on every step.
noise_injection and block_loss take their inputs as leaves and are differentiated with
torch.autograd.grad (nothing lands in `.grad`).
"""
import statistics
from dataclasses import dataclass

import torch
import torch.nn as nn

import head_memory
from bench_common import H100_PEAK_BYTES, H100_PEAK_FLOPS, Sizes, mnist_model, one_line
from head_memory import HeadShape
from noprop_fast.layers import ALL_BLOCKS, BlockLinear, block_slice
from noprop_fast.ops import PRECISIONS, PhiloxNoise, reference

# how a case's forward + backward takes its gradients (results.json's "gradients")
AUTOGRAD_GRAD = "torch.autograd.grad"
INTO_GRAD = ".backward() into .grad, set to None before each call"


@dataclass
class OpCase:
    op: str
    shape: str
    reference: object   # (**inputs) -> tensor
    fused: object       # (**inputs) -> tensor, or None
    inputs: dict        # the leaves: those requiring grad get gradients in forward+backward
    unit: str           # "bytes" (memory-bound) or "flops"
    work: dict          # pass -> bytes or flops, the formula in `formula`
    formula: str
    gradients: str = AUTOGRAD_GRAD  # or INTO_GRAD


def model_slice(param: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    """What the model hands an op when every block trains: the parameter itself (`block_slice`),
    cast to the compute dtype (a no-op at fp32), as BlockLinear.forward and DenoisingBlocks.denoise
    do; its gradient lands in param.grad."""
    return block_slice(param, ALL_BLOCKS).to(dtype)


def linear_call(op):
    """op(x, weight, bias) as BlockLinear.forward calls it; weight, bias the leaf parameters."""
    return lambda x, weight, bias: op(x, model_slice(weight, x.dtype), model_slice(bias, x.dtype))


def head_call(op):
    """op(h, k, c, v) as DenoisingBlocks.denoise calls it; k, c the head's leaf parameters."""
    return lambda h, k, c, v: op(h, model_slice(k, h.dtype), model_slice(c, h.dtype), v)


def op_cases(sizes: Sizes, device: torch.device, dtype: torch.dtype, ops) -> list[OpCase]:
    """The ops at the MNIST step's shapes (and the head at the language-model shape)."""
    es = torch.empty((), dtype=dtype).element_size()
    T, N, m = sizes.num_blocks, sizes.batch, sizes.num_classes
    d = m  # one-hot: d = m

    def rand(*size, grad=True, scale=1.0, kind=dtype):
        return (torch.randn(size, device=device) * scale).to(kind).requires_grad_(grad)

    def parameter(*size, scale=1.0):  # a model's parameter: fp32 whatever the compute dtype
        return nn.Parameter(torch.randn(size, device=device) * scale)

    cases = []
    # noise: the reference draws eps with torch.randn, as the reference step does
    noise = PhiloxNoise(0, device)
    a, s = torch.rand(T, device=device), torch.rand(T, device=device)
    fwd = es * (T * N * d + N * d) + 8 * N
    cases.append(OpCase(
        "noise_injection", f"B={T} N={N} d={d} m={m}",
        lambda y, W: reference.noise_injection(y, W, a, s),
        ops and (lambda y, W: ops.noise_injection(y, W, a, s, noise)),
        {"y": torch.arange(N, device=device) % m, "W": rand(m, d)}, "bytes",
        {"forward": fwd, "forward+backward": fwd + es * (T * N * d + m * d) + 8 * N},
        "fwd: es(BNd + Nd) + 8N (read W[y], labels; write z); bwd: es(BNd + md) + 8N"))
    w = torch.rand(T, device=device)
    fwd = es * (T * N * d + N * d)
    cases.append(OpCase(
        "block_loss", f"u_hat [{T},{N},{d}]",
        lambda u_hat, u: reference.block_loss(u_hat, u, w),
        ops and (lambda u_hat, u: ops.block_loss(u_hat, u, w)),
        {"u_hat": rand(T, N, d), "u": rand(N, d)}, "bytes",
        {"forward": fwd, "forward+backward": 3 * fwd},
        "fwd: es(BNd + Nd) (read u_hat, u); bwd: 2 es(BNd + Nd) (read both, write both grads)"))
    # block_linear at every shape a block FC has in the model (the last FC is the head's keys)
    _, model, _, _ = mnist_model(sizes, torch.device("cpu"))
    layers = {}
    for name, layer in model.blocks.named_modules():
        if isinstance(layer, BlockLinear) and name != "head":
            layers.setdefault((layer.in_features, layer.out_features), []).append(name)
    for (k_in, k_out), names in layers.items():
        flops = 2 * T * N * k_in * k_out
        cases.append(OpCase(
            "block_linear", f"[{T},{N},{k_in}]->{k_out} ({', '.join(names)})",
            linear_call(reference.block_linear),
            ops and linear_call(ops.block_linear),
            {"x": rand(T, N, k_in), "weight": parameter(T, k_out, k_in, scale=k_in ** -0.5),
             "bias": parameter(T, k_out)},
            "flops", {"forward": flops, "forward+backward": 3 * flops},
            "fwd: 2 B N K M_out; bwd: 2x fwd (dX and dW)", INTO_GRAD))
    D = model.blocks.head.in_features
    heads = [HeadShape(T, N, D, m, d), sizes.lm_head]
    for hs in heads:
        flops = 2 * hs.blocks * hs.rows * hs.classes * (hs.dim + hs.embed)
        drawn = head_memory.head_inputs(hs, device)  # fp32, from seed 0
        inputs = {"h": drawn["h"].to(dtype).detach().requires_grad_(),
                  "k": nn.Parameter(drawn["k"].detach()), "c": nn.Parameter(drawn["c"].detach()),
                  "v": drawn["v"].to(dtype).detach().requires_grad_()}
        cases.append(OpCase(
            "softmax_head", f"h [{hs.blocks},{hs.rows},{hs.dim}] k [{hs.blocks},{hs.classes},{hs.dim}] "
            f"v [{hs.classes},{hs.embed}]", head_call(reference.softmax_head),
            ops and head_call(ops.softmax_head), inputs,
            "flops", {"forward": flops, "forward+backward": 3 * flops},
            "fwd: 2 B N m (D + d); bwd: 2x fwd (dP, dH, dK, dV; the fused kernels' recomputation "
            "of the logits not counted)", INTO_GRAD))
    return cases


def time_ms(fn, device: torch.device, min_run_time: float) -> float:
    """Median milliseconds of fn(): triton's do_bench on GPU, blocked_autorange on CPU."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def pass_fn(op, inputs: dict, backward: bool, gradients: str = AUTOGRAD_GRAD):
    """A closure for one pass: op forward (grad mode on, as in training), or forward + backward,
    either through torch.autograd.grad (nothing accumulates in .grad between calls) or, INTO_GRAD,
    through .backward() into the leaves' .grad, each set to None first as the training step's
    optimizer.zero_grad(set_to_none=True) does."""
    needs = [t for t in inputs.values() if t.requires_grad]
    if not backward:
        return lambda: op(**inputs)
    grad_out = torch.randn_like(op(**inputs))
    if gradients == INTO_GRAD:
        def forward_backward():
            for t in needs:
                t.grad = None
            op(**inputs).backward(grad_out)
    else:
        def forward_backward():
            return torch.autograd.grad(op(**inputs), needs, grad_out)
    return forward_backward


def bench_ops(sizes: Sizes, device: torch.device, precision: str, ops, ops_status: str) -> list:
    """Reference and fused measured in turn, `sizes.op_repeats` times each (drift hits both alike);
    each figure is the median of its repeats, all of them kept in results.json."""
    rows = []
    peak_flops = H100_PEAK_FLOPS[precision]
    for case in op_cases(sizes, device, PRECISIONS[precision], ops):
        for mode in ("forward", "forward+backward"):
            row = {"op": case.op, "shape": case.shape, "pass": mode, "unit": case.unit,
                   "work": case.work[mode], "formula": case.formula, "gradients": case.gradients,
                   "fused_status": ops_status or "ok", "reference_ms_all": [], "fused_ms_all": []}
            backward = mode != "forward"
            reference = pass_fn(case.reference, case.inputs, backward, case.gradients)
            fused = None
            if case.fused is not None:
                try:
                    fused = pass_fn(case.fused, case.inputs, backward, case.gradients)
                except Exception as err:  # one op's failure is a figure, not the end of the run
                    row["fused_status"] = f"failed: {one_line(err)}"
            for _ in range(sizes.op_repeats):
                row["reference_ms_all"].append(time_ms(reference, device, sizes.min_run_time))
                if fused is not None:
                    row["fused_ms_all"].append(time_ms(fused, device, sizes.min_run_time))
            row["reference_ms"] = statistics.median(row["reference_ms_all"])
            row["fused_ms"] = statistics.median(row["fused_ms_all"]) if fused is not None else None
            if fused is not None:
                row["fused/reference"] = row["fused_ms"] / row["reference_ms"]
            if device.type == "cuda":
                for path in ("reference", "fused"):
                    if row[f"{path}_ms"] is not None:
                        rate = case.work[mode] / (row[f"{path}_ms"] * 1e-3)
                        peak = H100_PEAK_BYTES if case.unit == "bytes" else peak_flops
                        row[f"{path}_throughput"] = rate
                        row[f"{path}_of_h100_peak"] = rate / peak
            rows.append(row)
    return rows
