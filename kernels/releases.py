"""The Triton release the kernels run under, and the launch configurations that depend on it.

Every kernel file keeps the table of configurations measured with the current release (3.9.0).
Where an older release compiles one of them badly (ptxas spills registers, or the front end refuses
the tile), its replacement is listed in OLDER below, and `for_release` is the one place that picks
between the two, by `triton.__version__`. The launchers, the ahead-of-time check (AOT_SPECS,
tests/test_aot.py) and profiling/static_report.py read the kernel files' tables after this
choice, so all three see the configurations that will run.

OLDER was measured with triton 3.6.0 (what the GPU machines run) ahead of time for sm_90 and sm_80,
general and aligned arguments (tests/test_aot.py's three targets); each replacement is the closest
configuration found that compiles there without spills (and with HGMMA where the current one has
it). Releases before 3.9 take OLDER (3.7 and 3.8 have not been checked; they are nearer to 3.6's
compiler than to 3.9's); 3.9 and later take the kernel files' tables.
"""
import re

import triton

TRITON_RELEASE = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", triton.__version__).groups())
CURRENT_FROM = (3, 9)  # the release the kernel files' tables were measured with
USES_OLDER = TRITON_RELEASE < CURRENT_FROM

# (kernel file, the table's key) -> the configuration on releases before 3.9, with the reason.
OLDER = {
    # attention: key (kernel, fp32 inputs, Dh), value (BLOCK_M, BLOCK_N, num_warps, num_stages).
    # ptxas of 3.6 spills the current ones (registers at 255, stack in bytes, on sm_90 / sm_80):
    ("attention", ("bwd_dq", True, 32)): (64, 32, 8, 1),      # 128x32 w8 s1: 16 B stack, sm_90
    ("attention", ("bwd_dq", False, 32)): (128, 64, 8, 3),    # 128x64 w4 s3: 16 B stack, sm_80
    ("attention", ("bwd_dq", False, 128)): (64, 32, 8, 3),    # 64x64 w8 s3: 40 B stack, sm_90
    ("attention", ("bwd_dkdv", True, 16)): (64, 64, 8, 1),    # 64x64 w4 s1: 352 B, sm_90 aligned
    ("attention", ("bwd_dkdv", False, 16)): (64, 128, 8, 3),  # 64x128 w4 s3: 32 B stack, sm_80
    ("attention", ("bwd_dkdv", False, 32)): (32, 128, 8, 3),  # 64x128 w8 s3: 56 B stack, sm_80
    # softmax_head: key (kernel, fp32 inputs, d's tile), value (BLOCK_N, BLOCK_M, num_warps,
    # num_stages). The current ones spill under 3.6 (stack in bytes):
    ("softmax_head", ("bwd_dh", True, 256)): (32, 16, 8, 3),   # s2: 16 B, sm_90 aligned
    ("softmax_head", ("bwd_dk", False, 32)): (16, 64, 8, 1),   # w4: 16 B sm_90, 224 B sm_80
    ("softmax_head", ("bwd_dk", False, 128)): (16, 64, 8, 1),  # w4: 48 B sm_90, 224 B sm_80
    ("softmax_head", ("bwd_dv", True, 32)): (32, 16, 4, 2),    # s1: 8 B, sm_90
    ("softmax_head", ("bwd_dv", True, 128)): (16, 16, 4, 1),   # 32x16: 32 B, sm_90
    ("softmax_head", ("bwd_dv", True, 256)): (32, 16, 8, 2),   # 16x16 s1: 32 B, sm_90
    ("softmax_head", ("bwd_dv", False, 32)): (32, 32, 4, 1),   # 32x64: 56 B, sm_80
    ("softmax_head", ("bwd_dv", False, 256)): (16, 32, 8, 2),  # w4 s2: 24 B sm_80, 16 B sm_90 aligned
    # softmax_head's sm_90 fp16/bf16 tiles (_HOPPER_CONFIGS), key ("sm90", kernel, d's tile): the
    # same tiles with 8 warps, as 3.6 spills them with 4
    ("softmax_head", ("sm90", "bwd_dh", 256)): (64, 16, 8, 1),
    ("softmax_head", ("sm90", "bwd_dk", 256)): (16, 64, 8, 1),
    # block_linear: fp32 tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), smallest last.
    # 3.6's tl.dot needs K >= 16 (3.9 takes the current tiles' BLOCK_K = 8), and at K = 16 the
    # 128-row tiles spill on sm_90 (8 B of stack) unless they pipeline less or spread over more warps.
    ("block_linear", "fp32_tiles"): [(128, 128, 16, 8, 2), (128, 64, 16, 8, 3), (64, 64, 16, 4, 3),
                                     (64, 32, 16, 4, 3)],
}


ASKED = {}  # (kernel file, key) -> the current configuration, for every key the files asked about


def for_release(kernel: str, key, current):
    """The configuration `key` of kernel file `kernel`: `current` (the file's own, measured with
    3.9), or on an older release its replacement in OLDER where there is one."""
    ASKED[kernel, key] = current
    if USES_OLDER and (kernel, key) in OLDER:
        return OLDER[kernel, key]
    return current
