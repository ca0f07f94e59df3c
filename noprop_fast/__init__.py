"""noprop_fast: train neural networks with NoProp (arXiv 2503.24322), fast and faithfully.

Entry points: `python -m noprop_fast.train` (training) and `python -m noprop_fast.compare`
(NoProp-DT against its backprop baseline). The method's mathematics is in `schedule.py`.
"""
__version__ = "0.1.0"
