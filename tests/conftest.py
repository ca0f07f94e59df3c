"""Test collection.

Triton kernels run without a GPU under TRITON_INTERPRET=1, which must be set before Triton-using
modules are imported, so the kernel tests in tests/kernels/ run in a process of their own:
`tests/test_kernels_interpreter.py` starts it. They are collected here only in that process
(TRITON_INTERPRET=1) or where a GPU is present (`pytest -m gpu tests/kernels`).
"""
import os

import pytest

collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1":
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        collect_ignore.append("kernels")


@pytest.fixture(scope="session")
def word_shards(tmp_path_factory):
    """Byte shards of 3000 random words (a fifth held out for validation); tests only read them."""
    from helpers import text_shards, word_text
    return text_shards(tmp_path_factory.mktemp("shards"), word_text(3000))
