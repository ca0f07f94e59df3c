"""The dtypes each kind of kernel run covers, and the tolerances of the kernel tests: the table per
dtype (TOLERANCES, assert_close) is tests/helpers.py's, shared with the C++ ops' tests."""
import os

import torch

from helpers import TOLERANCES, assert_close  # noqa: F401

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"

# the interpreter runs fp32 and fp16 (a bf16 tl.dot is silently wrong there); a GPU adds bf16
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETER else [torch.bfloat16])

# causal attention (kernels/attention.py) against its fp32 reference: P and dS are rounded to the
# input dtype before their products and Delta = rowsum(dO * O) reads the stored (rounded) O, as
# flash attention does, so half-precision gradients carry about one input-dtype ulp of their size
# (measured worst cases at randn inputs, Dh <= 128, L <= 256: fp16 1.6e-3, bf16 1.9e-2 from a
# PyTorch emulation of the kernels' rounding points). With a sharp softmax (large scale) dP - Delta
# cancels; tests/kernels/test_attention.py multiplies atol by the gradient's size there.
ATTENTION_TOLERANCES = {  # dtype: (rtol, atol)
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 4e-3),
    torch.bfloat16: (5e-2, 3e-2),  # GPU only
}
