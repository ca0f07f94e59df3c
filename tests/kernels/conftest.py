"""Kernel tests run the same comparisons under the interpreter (CPU tensors) or on a GPU."""
import pytest

from tolerances import INTERPRETER


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.interpreter if INTERPRETER else pytest.mark.gpu)


@pytest.fixture
def device():
    return "cpu" if INTERPRETER else "cuda"
