"""Run Python code in a fresh process in which some installed packages cannot be imported, as on a
machine where they are not installed (the GPU machines have neither `datasets` nor `nvtx`); and
`needs_datasets`, the mark of the tests that need the package (skipped where it is absent).

A finder placed first on `sys.meta_path` answers every import of a hidden package, or of one of its
sub-modules, with the ModuleNotFoundError an absent package raises, before the installed copy is
found. The process starts with nothing imported, so no copy is cached in `sys.modules`.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_HIDE = """\
import sys


class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Hidden())
"""


def run_without(packages: set[str], code: str, *args: str, timeout: float = 300,
                **env) -> subprocess.CompletedProcess:
    """`python -c code args...` in the project root with `packages` hidden; stdout and stderr
    captured as text. `env` adds environment variables (one thread unless told otherwise)."""
    program = _HIDE.format(hidden=set(packages)) + textwrap.dedent(code)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", program, *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def installed(name: str) -> bool:
    """Whether `import name` can find the package (a hidden one counts as absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


needs_datasets = pytest.mark.skipif(not installed("datasets"),
                                    reason="the datasets package is not installed")
