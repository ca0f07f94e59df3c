"""Tolerances per dtype for a fused op against its plain-PyTorch reference (fp32 accumulation in
both), and the dtypes each kind of run covers: one table, used by every kernel test."""
import os

import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

TOLERANCES = {  # dtype: (rtol, atol)
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),  # GPU only: the interpreter has no bf16 arithmetic
}

# the interpreter runs fp32 and fp16 (a bf16 tl.dot is silently wrong there); a GPU adds bf16
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETER else [torch.bfloat16])


def assert_close(actual, expected, dtype, scale=1.0):
    """Compare in fp32 with the dtype's tolerances; `scale` multiplies atol (for large sums)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)
