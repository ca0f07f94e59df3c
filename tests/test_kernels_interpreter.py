"""Runs tests/kernels/ under TRITON_INTERPRET=1 in a process of its own (no GPU needed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent / "kernels"


@pytest.mark.interpreter
def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    if not list(KERNEL_TESTS.glob("test_*.py")):
        pytest.skip("no kernel tests yet")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(KERNEL_TESTS)], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
