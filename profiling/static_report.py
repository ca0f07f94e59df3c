"""A static H100 report of every Triton kernel a training step launches: no GPU needed.

    python profiling/static_report.py [--out DIR] [--configs mnist,cifar10,fineweb] [--kernels a,b]

For each config (noprop_fast/configs) it lists the kernel calls of one fused bf16 training step
(forward and backward), the configuration each launcher picks at those shapes, what ptxas makes of
it for sm_90 (`kernels.aot.compile_spec`: registers, spills, shared memory, HGMMA), the FLOPs and
minimum bytes of the call, and the time the H100's roofline allows. These are compile-time and
roofline figures, not measurements. --kernels keeps the rows whose kernel name contains one of the
given substrings. Writes DIR/report.md (default profiling/results/static-h100/).
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

PEAK_FLOPS = 989e12   # H100 SXM dense bf16 tensor-core FLOP/s
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
NUM_SMS = 132         # H100 SXM streaming multiprocessors (block_linear's tile estimate)
GPT2_VOCAB = 50257    # the FineWeb shards' GPT-2 tokens
IMAGE_DATA = {"mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
              "cifar100": ((3, 32, 32), 100)}  # dataset -> (image shape C, H, W; classes)
CONFIG_FILES = {"mnist": "mnist-noprop-onehot.yaml", "cifar10": "cifar10-noprop-onehot.yaml",
                "cifar100": "cifar100-noprop-onehot.yaml", "fineweb": "fineweb.yaml"}
BF16, FP32, INT64 = 2, 4, 8  # bytes per element


# ------------------------------------------------------------------------------------------------
# FLOPs and minimum bytes per call: (flops, bytes). e = bytes per element of the call's dtype; fp32
# side tensors (LSE, Delta, partial sums, fp32 o) at 4 bytes. FLOPs count a multiply-add as 2 and
# the products of the maths only (exp, Philox and masking are not counted).

def linear_fwd(B, N, K, M, e, bias=True):  # Y = X W^T + bias, 2BNKM; read X, W, bias; write Y
    return 2 * B * N * K * M, e * (B * N * K + B * M * K + B * M * bias + B * N * M)


def linear_dx(B, N, K, M, e):  # dX = G W, 2BNMK; read G, W; write dX
    return 2 * B * N * K * M, e * (B * N * M + B * M * K + B * N * K)


def linear_dw(B, N, K, M, e):  # dW = G^T X, 2BMNK; read G, X; write dW
    return 2 * B * N * K * M, e * (B * N * M + B * N * K + B * M * K)


def linear_dbias(B, N, M, e):  # dbias = column sums of G, BNM adds; read dY; write dbias
    return B * N * M, e * (B * N * M + B * M)


def head_fwd(B, N, m, D, d, e):  # S = HK^T + c, 2BNmD; O = PV, 2BNmd; read h,k,c,v; write o,L fp32
    return 2 * B * N * m * (D + d), e * (B * N * D + B * m * D + B * m + m * d) + FP32 * (B * N * d + B * N)


def head_bwd_dh(B, N, m, D, d, e):  # S, dP = dO V^T, dH = dS K: 2BNm(2D+d); + o, L read, Delta written
    return (2 * B * N * m * (2 * D + d),
            e * (B * N * D + B * m * D + B * m + m * d + B * N * d + B * N * D) + FP32 * (B * N * d + 2 * B * N))


def head_bwd_dk(B, N, m, D, d, e):  # S, dP, dK = dS^T H: 2BNm(2D+d); read h,k,c,v,dO,L,Delta; dk,dc
    return (2 * B * N * m * (2 * D + d),
            e * (B * N * D + 2 * B * m * D + 2 * B * m + m * d + B * N * d) + FP32 * 2 * B * N)


def head_bwd_dv(B, N, m, D, d, e):  # S, dV = sum_b P^T dO: 2BNm(D+d); read h,k,c,dO,L; write dv
    return 2 * B * N * m * (D + d), e * (B * N * D + B * m * D + B * m + B * N * d + m * d) + FP32 * B * N


def causal_pairs(L):  # (query, key) pairs at or below the diagonal of one head
    return L * (L + 1) // 2


def attn_fwd(Z, H, L, Dh, e):  # QK^T and PV over the causal pairs, 4 ZH pairs Dh; read q,k,v; o, LSE
    return 4 * Z * H * causal_pairs(L) * Dh, e * 4 * Z * H * L * Dh + FP32 * Z * H * L


def attn_bwd_delta(Z, H, L, Dh, e):  # Delta = rowsum(dO * O), 2ZHLDh; read o, dO; write Delta fp32
    return 2 * Z * H * L * Dh, e * 2 * Z * H * L * Dh + FP32 * Z * H * L


def attn_bwd_dq(Z, H, L, Dh, e):  # S, dP, dQ = dS K: 6 ZH pairs Dh; read q,k,v,dO,LSE,Delta; dq
    return 6 * Z * H * causal_pairs(L) * Dh, e * 5 * Z * H * L * Dh + FP32 * 2 * Z * H * L


def attn_bwd_dkdv(Z, H, L, Dh, e):  # S^T, dV, dP^T, dK: 8 ZH pairs Dh; read q,k,v,dO,LSE,Delta; dk,dv
    return 8 * Z * H * causal_pairs(L) * Dh, e * 6 * Z * H * L * Dh + FP32 * 2 * Z * H * L


def noise_fwd(B, N, m, d, e):  # z = a u + s eps, 3BNd; read y, the min(m, N) rows of W used, a, s; z
    return 3 * B * N * d, INT64 * N + e * min(m, N) * d + FP32 * 2 * B + e * B * N * d


def noise_bwd(B, N, m, d, e):  # dW[y_n] += sum_b a_b dz[b, n], 2BNd; read dz, y, a; write dW rows fp32
    return 2 * B * N * d, e * B * N * d + INT64 * N + FP32 * B + FP32 * min(m, N) * d


def loss_partial(B, M, chunks, e):  # sum (u_hat - u)^2, 3BM; read u_hat, u; write partials fp32
    return 3 * B * M, e * (B * M + M) + FP32 * B * chunks


def loss_finish(B, chunks):  # w_b / N * sum of partials, B(chunks + 2); fp32 in and out
    return B * (chunks + 2), FP32 * (B * chunks + 2 * B)


def loss_bwd(B, M, e):  # du_hat = c_b (u_hat - u), du = -sum_b: 4BM; read u_hat, u, dL, w; du_hat, du
    return 4 * B * M, e * (2 * B * M + 2 * M) + FP32 * 2 * B


def roofline(flops, nbytes):
    """(seconds, bound): the larger of the compute time at the bf16 peak and the HBM time."""
    compute, memory = flops / PEAK_FLOPS, nbytes / PEAK_BYTES
    return (compute, "compute") if compute >= memory else (memory, "memory")


# ------------------------------------------------------------------------------------------------
# The calls of one training step

@dataclass
class Call:
    op: str         # the fused op (block_linear, softmax_head, ...)
    kernel: str     # the AOT spec's name: kernel, dtype and configuration
    layer: str      # where the model makes the call, e.g. "qkv" or "z_T"
    shape: str      # the call's shapes in words
    config: str     # block sizes, warps, stages as the launcher picks them
    count: int      # calls per training step
    flops: int
    nbytes: int
    aligned: bool   # every size a multiple of 16: compiled with the runtime's alignment hints
    spec: object = None  # a KernelSpec built here (None: AOT_SPECS[kernel])


def _aligned(*sizes):
    return all(s % 16 == 0 for s in sizes)


def _tile_estimate(tile, batch, M, N, K):
    """Roofline time of one autotune tile of C [M, N] = A [M, K] B [K, N]: whole tiles and waves of
    NUM_SMS programs at the peak, and A re-read per column of tiles, B per row of tiles (no L2)."""
    bm, bn, bk = tile[:3]
    programs = batch * math.ceil(M / bm) * math.ceil(N / bn)
    flops = math.ceil(programs / NUM_SMS) * NUM_SMS * 2 * bm * bn * math.ceil(K / bk) * bk
    traffic = BF16 * batch * (math.ceil(N / bn) * M * K + math.ceil(M / bm) * N * K + M * N)
    return roofline(flops, traffic)[0]


def linear_calls(layer, B, N, K, M, count=1, need_dx=True):
    """block_linear's kernels for X [B, N, K] -> Y [B, N, M] (with bias)."""
    from noprop_fast.kernels import block_linear as bl
    calls, shape = [], f"X [{B}, {N}, {K}], W [{B}, {M}, {K}]"
    sites = [("fwd", (N, M, K), linear_fwd(B, N, K, M, BF16)),
             ("dx", (N, K, M), linear_dx(B, N, K, M, BF16)),
             ("dw", (M, K, N), linear_dw(B, N, K, M, BF16))]
    for site, (pm, pn, pk), (flops, nbytes) in sites:
        if site == "dx" and not need_dx:
            continue
        tile = min(bl._HALF_TILES, key=lambda t: _tile_estimate(t, B, pm, pn, pk))
        m, n, k, w, s = tile
        calls.append(Call("block_linear", f"block_linear_{site}_bf16[{m}x{n}x{k},w{w},s{s}]", layer,
                          f"{site}: [{pm}x{pk}] @ [{pk}x{pn}] x{B}; {shape}",
                          f"{m}x{n}x{k} w{w} s{s} (autotuned; best tile estimate)", count, flops,
                          nbytes, _aligned(N, K, M)))
    # dbias = the sum over rows of dY: the bias gradient kernel, as its AOT spec compiles it
    calls.append(Call("block_linear", "block_linear_bias_grad_bf16", layer, f"dY [{B}, {N}, {M}]",
                      f"{bl._GRAD_BLOCK_N}x{bl._GRAD_BLOCK_C} w{bl._GRAD_WARPS}", count,
                      *linear_dbias(B, N, M, BF16), _aligned(N, M)))
    return calls


def head_calls(B, N, m, D, d):
    """softmax_head's four kernels: h [B, N, D], keys [B, m, D], c [B, m], values [m, d]."""
    import torch
    from noprop_fast.kernels import softmax_head as sh
    calls = []
    for kernel, formula in (("fwd", head_fwd), ("bwd_dh", head_bwd_dh), ("bwd_dk", head_bwd_dk),
                            ("bwd_dv", head_bwd_dv)):
        cfg = sh._config(kernel, torch.bfloat16, d, arch=90)  # the H100's tiles
        sm90 = ",sm90" if (kernel, cfg["BLOCK_DV"]) in sh._HOPPER_CONFIGS else ""  # AOT_SPECS' name
        calls.append(Call("softmax_head", f"softmax_head_{kernel}[bf16,d{cfg['BLOCK_DV']}{sm90}]", "head",
                          f"h [{B}, {N}, {D}], k [{B}, {m}, {D}], v [{m}, {d}]",
                          f"N {cfg['BLOCK_N']} x m {cfg['BLOCK_M']}, D {cfg['BLOCK_D']}, d "
                          f"{cfg['BLOCK_DV']}, w{cfg['num_warps']} s{cfg['num_stages']}", 1,
                          *formula(B, N, m, D, d, BF16), _aligned(N, m, D, d)))
        if cfg.get("DELTA_GIVEN"):  # Delta = rowsum(dO * O) ahead of dH: 2BNd; read dO, o; write fp32
            calls.insert(-1, Call("softmax_head", f"softmax_head_bwd_delta[bf16,d{cfg['BLOCK_DV']}]",
                                  "head", f"o, dO [{B}, {N}, {d}]", f"{sh.DELTA_ROWS} rows w4", 1,
                                  2 * B * N * d, BF16 * B * N * d + FP32 * (B * N * d + B * N),
                                  _aligned(N, d)))
    return calls


def attention_calls(Z, H, L, Dh, count):
    import torch
    from noprop_fast.kernels import attention as at
    calls, shape = [], f"q, k, v [{Z}, {H}, {L}, {Dh}]"
    for kernel, formula in (("fwd", attn_fwd), ("bwd_delta", attn_bwd_delta),
                            ("bwd_dq", attn_bwd_dq), ("bwd_dkdv", attn_bwd_dkdv)):
        if kernel == "bwd_delta":
            name, config = f"attention_bwd_delta[bf16,dh{Dh}]", f"{at.DELTA_ROWS} rows w4"
        else:
            c = at._config(kernel, torch.bfloat16, Dh)
            name = (f"attention_{kernel}[bf16,dh{Dh},{c['BLOCK_M']}x{c['BLOCK_N']},"
                    f"w{c['num_warps']},s{c['num_stages']}]")
            config = f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
        calls.append(Call("attention", name, "attention", shape, config, count,
                          *formula(Z, H, L, Dh, BF16), _aligned(L, Dh)))
    return calls


def noise_calls(B, N, m, d, backward):
    from noprop_fast.kernels import noise
    br, bd = noise._blocks(d)
    calls = []
    for blocks, layer in ((B, "z_t"), (1, "z_T")):  # every block's z_{t-1}, and z_T for the CE
        shape = f"y [{N}], W [{m}, {d}], z [{blocks}, {N}, {d}]"
        for kernel, formula in (("fwd", noise_fwd), ("bwd", noise_bwd))[:1 + backward]:
            calls.append(Call("noise", f"noise_{kernel}[bf16,{br}x{bd},w4]", layer, shape,
                              f"{br}x{bd} w4", 1, *formula(blocks, N, m, d, BF16), _aligned(N, d)))
    return calls


def loss_calls(B, N, d):
    from noprop_fast.kernels import block_loss as bk
    M = N * d
    block = bk._pick_block(M)
    tiles = math.ceil(M / block)
    chunks = math.ceil(tiles / math.ceil(tiles / min(tiles, bk.MAX_CHUNKS)))
    shape, ok = f"u_hat [{B}, {N}, {d}], u [{N}, {d}]", _aligned(M)
    return [Call("block_loss", f"block_loss_partial[bf16,{block}]", "loss", shape,
                 f"{block} x {chunks} chunks w4", 1, *loss_partial(B, M, chunks, BF16), ok),
            Call("block_loss", "block_loss_finish[fp32]", "loss", f"partials [{B}, {chunks}]",
                 f"{bk.MAX_CHUNKS} w4", 1, *loss_finish(B, chunks), ok),
            Call("block_loss", f"block_loss_bwd[bf16,{block}]", "loss", shape, f"{block} w4", 1,
                 *loss_bwd(B, M, BF16), ok)]


def image_calls(cfg):
    """NoProp-DT on images (models/image.py), every block in one step; convs and BN are PyTorch."""
    from noprop_fast.models.image import CONV_CHANNELS, FUSION_HIDDEN, HIDDEN
    (c, h, w), classes = IMAGE_DATA[cfg["dataset"]]
    if cfg.get("embedding", "onehot") != "onehot":
        raise SystemExit(f"static_report: only one-hot image configs are described, got "
                         f"{cfg.get('embedding')}")
    T, N, d = cfg["num_blocks"], cfg["batch_size"], classes
    flat = CONV_CHANNELS[-1] * (h // 4) * (w // 4)
    return (noise_calls(T, N, classes, d, backward=False)  # one-hot W_embed: a buffer, no gradient
            + linear_calls("image fc", T, N, flat, HIDDEN)
            + linear_calls("latent fc1", T, N, d, HIDDEN, need_dx=False)  # z needs no gradient
            + linear_calls("latent fc2, fc3", T, N, HIDDEN, HIDDEN, count=2)
            + linear_calls("fuse fc1", T, N, 2 * HIDDEN, HIDDEN)
            + linear_calls("fuse fc2", T, N, HIDDEN, FUSION_HIDDEN)
            + head_calls(T, N, classes, FUSION_HIDDEN, d) + loss_calls(T, N, d))


def lm_calls(cfg):
    """NoProp-LM (models/lm.py): T blocks of `layers_per_block` causal layers, learned W_embed."""
    from noprop_fast.models.lm import MAX_QUERY
    T, n, L = cfg["num_blocks"], cfg["batch_size"], cfg["seq_len"]
    D, heads, d, layers = cfg["width"], cfg["heads"], cfg["embed_dim"], cfg.get("layers_per_block", 1)
    M, V, Dq = n * L, GPT2_VOCAB, min(D, MAX_QUERY)
    learned = cfg.get("embed_init", "learned") == "learned"
    return (noise_calls(T, M, V, d, backward=learned)
            + linear_calls("qkv", T, M, D, 3 * D, layers) + attention_calls(T * n, heads, L, D // heads, layers)
            + linear_calls("proj", T, M, D, D, layers) + linear_calls("fc", T, M, D, 4 * D, layers)
            + linear_calls("out", T, M, 4 * D, D, layers) + linear_calls("latent fc", T, M, d, D, need_dx=learned)
            + linear_calls("fuse fc", T, M, 2 * D, D) + linear_calls("query", T, M, D, Dq)
            + head_calls(T, M, V, Dq, d) + loss_calls(T, M, d))


# ------------------------------------------------------------------------------------------------
# Compilation and the report

def _specs_by_name():
    from noprop_fast.kernels.aot import all_specs
    return {spec.name: spec for spec in all_specs()}


def compile_calls(calls, arch=90):
    """Compiled for each call, compiling each (spec, aligned) once."""
    from noprop_fast.kernels.aot import compile_spec
    specs, cache = _specs_by_name(), {}
    for call in calls:
        key = (call.kernel, call.aligned)
        if key not in cache:
            cache[key] = compile_spec(call.spec or specs[call.kernel], arch, call.aligned)
    return [cache[call.kernel, call.aligned] for call in calls]


def _num(x):
    return f"{x:.3g}" if x < 1e4 else f"{x:.3e}"


def config_section(name, calls, compiled):
    rows = ["| op | layer | kernel | shape | config | calls | regs | stack/local B | smem KiB | HGMMA "
            "| FLOP/call | bytes/call | FLOP/B | roofline us/call | bound |",
            "|" + "---|" * 15]
    total_time = total_flops = total_bytes = 0
    notes = []
    for call, comp in zip(calls, compiled):
        seconds, bound = roofline(call.flops, call.nbytes)
        total_time += call.count * seconds
        total_flops += call.count * call.flops
        total_bytes += call.count * call.nbytes
        hgmma = "yes" if comp.uses_wgmma else ("**no (expected)**" if comp.spec.expects_wgmma else "no")
        if comp.spills:
            notes.append(f"- {call.kernel} ({call.layer}) spills: stack {comp.stack} B, local {comp.local} B")
        if comp.spec.expects_wgmma and not comp.uses_wgmma:
            notes.append(f"- {call.kernel} ({call.layer}): no HGMMA in the sm_90 SASS")
        elif bound == "compute" and not comp.uses_wgmma:
            notes.append(f"- {call.kernel} ({call.layer}): compute-bound on the roofline but no HGMMA "
                         f"(its leading tile is under one warpgroup's 64 rows: mma.sync at best)")
        rows.append(f"| {call.op} | {call.layer} | `{call.kernel}` | {call.shape} | {call.config} | "
                    f"{call.count} | {comp.registers} | {comp.stack}/{comp.local} | "
                    f"{comp.shared / 1024:.1f} | {hgmma} | {_num(call.flops)} | {_num(call.nbytes)} | "
                    f"{call.flops / call.nbytes:.3g} | {seconds * 1e6:.3g} | {bound} |")
    total = (f"**Step total ({name})**: roofline time {total_time * 1e3:.4g} ms, "
             f"{total_flops:.4g} FLOPs, {total_bytes:.4g} bytes over {sum(c.count for c in calls)} "
             f"kernel calls.")
    checks = "\n".join(notes) or "No kernel spills; every compute-bound kernel uses HGMMA."
    return "\n".join([f"## {name}", "", *rows, "", total, "", checks, ""]), (total_time, total_flops, total_bytes)


def load_config(name):
    import yaml
    if name not in CONFIG_FILES:
        raise SystemExit(f"static_report: unknown config {name!r}; choose from {sorted(CONFIG_FILES)}")
    return yaml.safe_load((ROOT / "noprop_fast" / "configs" / CONFIG_FILES[name]).read_text())


def config_calls(name, kernels=None):
    """The kernel calls of one training step at the named config's shapes (no compilation);
    kernels: keep the calls whose kernel name contains one of these substrings."""
    cfg = load_config(name)
    calls = lm_calls(cfg) if cfg.get("task") == "lm" else image_calls(cfg)
    if kernels:
        calls = [c for c in calls if any(k in c.kernel for k in kernels)]
    if not calls:
        raise SystemExit(f"static_report: no kernel of {name} matches {kernels}")
    return calls


def compute_bound_without_wgmma(calls):
    """The calls that are compute-bound on the roofline but whose configuration is not built for
    HGMMA (its spec's expects_wgmma, which tests/test_aot.py holds to the sm_90 SASS): a matmul
    that would run on mma.sync or FMA units, without compiling anything."""
    specs = _specs_by_name()
    return [c for c in calls if roofline(c.flops, c.nbytes)[1] == "compute"
            and not (c.spec or specs[c.kernel]).expects_wgmma]


def build_report(names, kernels=None):
    """(markdown, {config: (roofline seconds, FLOPs, bytes)}) for the named configs; kernels: keep
    the calls whose kernel name contains one of these substrings."""
    sections, totals = [], {}
    for name in names:
        calls = config_calls(name, kernels)
        section, totals[name] = config_section(f"{name} ({CONFIG_FILES[name]})", calls,
                                               compile_calls(calls))
        sections.append(section)
    header = f"""# Static H100 kernel report

These are compile-time and roofline figures, not measurements: no GPU was used. Each kernel is
compiled for sm_90 with the ptxas of the Triton wheel (`kernels.aot.compile_spec`; with alignment
hints when every size of the call is a multiple of 16) and read with cuobjdump / nvdisasm. The
roofline time is max(FLOPs / {PEAK_FLOPS:.3g} FLOP/s, bytes / {PEAK_BYTES:.3g} B/s), assuming an
H100 SXM: {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16 (also used for the non-matmul kernels, all far
on the memory side) and {PEAK_BYTES / 1e12:.2f} TB/s HBM3. Bytes are the minimum: each input read
once, each output written once, in the call's dtypes. FLOPs count the maths' products and sums
only (no exp, Philox, masks). A step is one fused bf16 training step of NoProp with every block at
once, forward and backward, counting calls as the model makes them (each already batched over the
T blocks); PyTorch ops (convolutions, norms, GELU, cross-entropy, optimiser) are not included.
block_linear is autotuned: the tile shown is the one with the best roofline estimate of its own
(whole tiles, waves of {NUM_SMS} programs, operands re-read per tile row/column without L2), not
necessarily the one the autotuner times fastest. FineWeb's vocabulary: {GPT2_VOCAB} (GPT-2).

Command: `python profiling/static_report.py --configs {','.join(names)}"""
    header += (f" --kernels {','.join(kernels)}`" if kernels else "`") + "\n"
    return "\n".join([header, *sections]), totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "profiling" / "results" / "static-h100"))
    parser.add_argument("--configs", default="mnist,cifar10,fineweb")
    parser.add_argument("--kernels", default="", help="comma-separated substrings of kernel names")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report, totals = build_report(args.configs.split(","), [k for k in args.kernels.split(",") if k])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    for name, (seconds, flops, nbytes) in totals.items():
        print(f"{name}: roofline {seconds * 1e3:.4g} ms, {flops:.4g} FLOPs, {nbytes:.4g} bytes")
    print(f"wrote {out / 'report.md'} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
