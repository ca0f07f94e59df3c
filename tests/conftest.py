"""Test collection.

Triton kernels run without a GPU under TRITON_INTERPRET=1, which must be set before Triton-using
modules are imported, so the kernel tests in tests/kernels/ run in a process of their own:
`tests/test_kernels_interpreter.py` starts it. They are collected here only in that process
(TRITON_INTERPRET=1) or where a GPU is present (`pytest -m gpu tests/kernels`).
"""
import os

collect_ignore = []
if os.environ.get("TRITON_INTERPRET") != "1":
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        collect_ignore.append("kernels")
