"""profiling/static_report.py: the FLOP/byte formulas against hand counts, the roofline, and one
small end-to-end report (compiled for sm_90 without a GPU)."""
import importlib.util
import math
import os
import re
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "profiling" / "static_report.py"
_spec = importlib.util.spec_from_file_location("static_report", _PATH)
sr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sr)


def test_linear_counts_by_hand():
    # X [2, 3, 4] x W [2, 5, 4]: 2 blocks of a [3x4] @ [4x5] product, 2 FLOPs per multiply-add
    assert sr.linear_fwd(2, 3, 4, 5, 2, bias=False) == (2 * 2 * 3 * 4 * 5, 2 * (24 + 40 + 30))
    assert sr.linear_fwd(2, 3, 4, 5, 2) == (240, 2 * (24 + 40 + 10 + 30))  # + bias [2, 5]
    assert sr.linear_dx(2, 3, 4, 5, 4) == (240, 4 * (30 + 40 + 24))        # G, W in; dX out
    assert sr.linear_dw(2, 3, 4, 5, 2) == (240, 2 * (30 + 24 + 40))        # G, X in; dW out
    assert sr.linear_dbias(2, 3, 5, 2) == (30, 2 * (30 + 10))


def test_head_and_attention_counts_by_hand():
    # h [1, 2, 4], k [1, 3, 4], v [3, 5]: S 2*2*3*4 = 48, PV 2*2*3*5 = 60 FLOPs
    flops, nbytes = sr.head_fwd(1, 2, 3, 4, 5, 2)
    assert flops == 108
    assert nbytes == 2 * (8 + 12 + 3 + 15) + 4 * (10 + 2)  # h, k, c, v in bf16; o, L in fp32
    assert sr.head_bwd_dh(1, 2, 3, 4, 5, 2)[0] == 48 + 60 + 48  # S, dP, dH
    assert sr.head_bwd_dv(1, 2, 3, 4, 5, 2)[0] == 108           # S, dV
    # one head, L = 3: 6 causal pairs; Dh = 2: QK^T and PV are 2 * 6 * 2 FLOPs each
    assert sr.causal_pairs(3) == 6
    assert sr.attn_fwd(1, 1, 3, 2, 2) == (48, 2 * 4 * 6 + 4 * 3)
    assert sr.attn_bwd_dkdv(1, 1, 3, 2, 2)[0] == 4 * 24


def test_noise_and_loss_counts_by_hand():
    # B 2, N 3 labels, m 10 classes, d 4: z is 24 elements, 3 rows of W at most are read
    assert sr.noise_fwd(2, 3, 10, 4, 2) == (72, 8 * 3 + 2 * 12 + 4 * 4 + 2 * 24)
    assert sr.noise_bwd(2, 3, 10, 4, 2) == (48, 2 * 24 + 8 * 3 + 4 * 2 + 4 * 12)
    assert sr.loss_partial(2, 6, 1, 2) == (36, 2 * (12 + 6) + 4 * 2)
    assert sr.loss_bwd(2, 6, 2) == (48, 2 * (24 + 12) + 4 * 4)


def test_roofline_picks_the_binding_limit():
    seconds, bound = sr.roofline(989e12, 1.0)  # one second of bf16 peak, next to no bytes
    assert bound == "compute" and seconds == pytest.approx(1.0)
    seconds, bound = sr.roofline(1.0, 3.35e12 / 2)  # half a second of HBM, next to no FLOPs
    assert bound == "memory" and seconds == pytest.approx(0.5)
    # a 4096^3 bf16 matmul is compute-bound, an elementwise pass memory-bound
    assert sr.roofline(*sr.linear_fwd(1, 4096, 4096, 4096, 2, bias=False))[1] == "compute"
    assert sr.roofline(*sr.linear_dbias(1, 4096, 4096, 2))[1] == "memory"


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fineweb"])
def test_every_compute_bound_kernel_is_built_for_hgmma(name):
    """At each config's shapes, every kernel call that is compute-bound on the roofline launches a
    configuration that expects HGMMA (a leading tile of a warpgroup's 64 rows in fp16/bf16);
    tests/test_aot.py checks the sm_90 SASS of every such configuration. No compilation here."""
    pytest.importorskip("triton")
    calls = sr.config_calls(name)
    assert any(sr.roofline(c.flops, c.nbytes)[1] == "compute" for c in calls) or name != "fineweb"
    missing = sr.compute_bound_without_wgmma(calls)
    assert not missing, [f"{c.kernel} ({c.layer})" for c in missing]


@pytest.mark.aot
def test_small_report_end_to_end(tmp_path):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("ahead-of-time compilation runs without the interpreter")
    sr.main(["--out", str(tmp_path), "--configs", "mnist", "--kernels", "noise_fwd,block_loss_finish"])
    text = (tmp_path / "report.md").read_text()
    assert "not measurements" in text and "no GPU was used" in text
    header = next(line for line in text.splitlines() if line.startswith("| op |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for column in ("kernel", "config", "regs", "stack/local B", "smem KiB", "HGMMA", "FLOP/call",
                   "bytes/call", "roofline us/call", "bound"):
        assert column in columns
    rows = [line for line in text.splitlines() if line.startswith("| noise") or
            line.startswith("| block_loss")]
    assert len(rows) == 3  # noise_fwd for z_t and z_T, and the loss's final sum
    at = columns.index("roofline us/call")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert math.isfinite(float(cells[at])) and float(cells[at]) > 0
        assert cells[columns.index("bound")] == "memory"
    assert re.search(r"Step total .*roofline time [0-9.e+-]+ ms", text)
