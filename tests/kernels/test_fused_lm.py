"""The language models on the Triton fused path (attention, FC, head, noise, block loss, and the
chunked cross-entropy) against the reference path: the loss and every parameter's gradient of one
step on identical noise. CPU tensors under TRITON_INTERPRET=1 (fp32), CUDA tensors on a GPU."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared side-by-side harness
from step_equivalence import assert_same_lm_step  # noqa: E402

from noprop_fast.ops import REFERENCE, fused_ops  # noqa: E402
from noprop_fast.models.lm import GPT, LanguageModel  # noqa: E402
from noprop_fast.schedule import NoiseSchedule  # noqa: E402

V, L, T = 37, 19, 2


def build(method, ops, device):
    torch.manual_seed(0)
    model = (LanguageModel(T, V, L, 32, 2, 1, 8) if method == "noprop" else GPT(T, V, L, 32, 2))
    return model.to(device).configure(ops)


@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_triton_lm_step_matches_the_reference(method, device):
    ops = fused_ops(torch.device(device), backend="triton")
    ref, fused = build(method, REFERENCE, device), build(method, ops, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, L), generator=g).to(device)
    y = torch.randint(0, V, (3, L), generator=g).to(device)
    assert_same_lm_step(ref, fused, NoiseSchedule.cosine(T, device=device), x, y, seed=5)
