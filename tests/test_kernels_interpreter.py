"""Runs each file of tests/kernels/ under TRITON_INTERPRET=1 in a process of its own (no GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = sorted((Path(__file__).parent / "kernels").glob("test_*.py"))


@pytest.mark.interpreter
@pytest.mark.parametrize("path", KERNEL_TESTS, ids=[p.stem for p in KERNEL_TESTS])
def test_kernels_under_the_triton_interpreter(path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
