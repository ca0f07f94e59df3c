"""noprop_fast: train neural networks with NoProp (arXiv 2503.24322), fast and faithfully.

Entry points: `python -m noprop_fast.train` (training) and `python -m noprop_fast.compare`
(NoProp-DT, -CT and -FM against a backprop baseline). The method's mathematics is in `noprop.py`,
`continuous.py` (CT and FM) and `schedule.py`.

Installed, the top-level folders kernels/ and csrc/ are the subpackages `noprop_fast.kernels` and
`noprop_fast.csrc` (setup.py maps them). From a source checkout that is not installed (its root on
PYTHONPATH, or the current folder), `_CheckoutFolders` finds them in that checkout's folders, so
the engine runs from a fresh copy with nothing installed.
"""
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
_SUBPACKAGES = {f"{__name__}.kernels": _PACKAGE.parent / "kernels",
                f"{__name__}.csrc": _PACKAGE.parent / "csrc"}


class _CheckoutFolders:
    """Finds noprop_fast.kernels and noprop_fast.csrc in the checkout this package was imported
    from, ahead of any other finder: a subpackage comes from the same copy as its parent."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _SUBPACKAGES.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not (_PACKAGE / "kernels").is_dir() and all((f / "__init__.py").is_file()
                                               for f in _SUBPACKAGES.values()):
    if not any(getattr(f, "__name__", "") == "_CheckoutFolders" for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFolders)
