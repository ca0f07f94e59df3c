"""The Triton fused path trains like the reference path, step by step: CPU tensors under
TRITON_INTERPRET=1 (fp32), CUDA tensors on a GPU (fp32 and bf16)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared side-by-side harness
from step_equivalence import assert_same_losses, losses_side_by_side  # noqa: E402

from tolerances import INTERPRETER  # noqa: E402

PRECISIONS = ["fp32"] if INTERPRETER else ["fp32", "bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("config", [
    {"embedding": "onehot"},
    {"embedding": "learned", "block_schedule": "sequential"},
    {"method": "noprop-ct", "embedding": "learned"},
    {"method": "noprop-fm", "embedding": "learned"},
], ids=["onehot", "learned-sequential", "ct", "fm"])
def test_triton_path_matches_reference_step_by_step(config, precision, device):
    rows = losses_side_by_side("triton", steps=3, precision=precision, device=device, **config)
    assert_same_losses(rows, precision)
