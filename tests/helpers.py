"""Helpers shared by test files here and in tests/kernels/ (plain `import helpers`: pytest puts
tests/ on the path through tests/conftest.py, also for a kernel test file run on its own)."""
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from noprop_fast.data.shards import write_shard
from noprop_fast.data.tokenizer import ByteTokenizer
from noprop_fast.errors import DataError

WORDS = ("alpha ", "beta ", "gamma ", "delta ", "noprop ", "blocks ", "train ")

TOLERANCES = {  # dtype: (rtol, atol) of a fused op against its reference (fp32 accumulation in both)
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),  # GPU or C++ only: the Triton interpreter has no bf16 arithmetic
}


def assert_close(actual, expected, dtype, scale=1.0):
    """Compare in fp32 with the dtype's tolerances; `scale` multiplies atol (for large sums)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)


def raises_one_line(fn, *needles, error=DataError):
    """Call fn, require a one-line `error` containing every needle; return the message."""
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


def word_text(count: int, words=WORDS) -> str:
    """`count` words drawn from `words` with a fixed seed."""
    rng = np.random.default_rng(0)
    return "".join(words[i] for i in rng.integers(0, len(words), count))


def text_shards(folder, text: str, val_tokens: int | None = None):
    """Byte shards of `text` in `folder`: the first `val_tokens` (a fifth by default) for
    validation, the rest for training."""
    ids = ByteTokenizer().encode(text)
    cut = len(ids) // 5 if val_tokens is None else val_tokens
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "demo_val_000000.bin", ids[:cut], tokenizer="byte")
    write_shard(folder / "demo_train_000001.bin", ids[cut:], tokenizer="byte")
    return folder


def philox_noise(seed, offset, B, N, d):
    """The fused ops' noise for blocks [B, N, d] at (seed, offset), from the PyTorch reference."""
    from noprop_fast.ops.reference import philox_randn as philox_randn_ref
    return philox_randn_ref(seed, offset + torch.arange(B * N * d, dtype=torch.int64)).view(B, N, d)


class CreatedTensors(TorchDispatchMode):
    """Records the shape and size in bytes of every tensor an aten op returns (ATen calls from C++
    and the Triton interpreter's own copies of the kernels' arguments included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.sizes.append(t.numel() * t.element_size())
        return out

    @property
    def largest(self) -> int:
        """The most elements of one tensor created."""
        return max((math.prod(shape) for shape in self.shapes), default=0)
