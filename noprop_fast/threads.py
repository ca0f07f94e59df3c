"""How many intra-op threads a CPU run uses, and how its OpenMP threads wait (the rule and its
measurements: docs/performance.md, "Threads on a CPU"). The runtime reads the wait policy once, when
torch loads it, so the entry points call `passive_wait_unless_set()` before anything imports torch.
"""
import os
import sys

COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch sets its count from these
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")    # the OpenMP runtime reads these
_wait = {"policy": None}  # what passive_wait_unless_set found or did, for the header line


def passive_wait_unless_set() -> None:
    """Ask OpenMP threads to sleep while they wait, unless the user chose a wait policy or torch is
    already loaded (then it is too late: the runtime has read its environment)."""
    if _wait["policy"] == "passive":
        return  # set here already (compare imports train)
    chosen = [name for name in WAIT_VARIABLES if os.environ.get(name)]
    if chosen:
        _wait["policy"] = f"{chosen[0]}={os.environ[chosen[0]]}"
    elif "torch" in sys.modules:
        _wait["policy"] = None  # the runtime's default: waiting threads spin a while
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _wait["policy"] = "passive"


def apply(requested: int | None) -> str:
    """Set torch's intra-op thread count (`requested`: --threads, None: keep torch's count) and
    return what the header says of it, e.g. "2 threads: one per core, waiting threads sleep"."""
    import torch
    if requested is not None:
        torch.set_num_threads(requested)
        why = "--threads"
    else:
        named = [name for name in COUNT_VARIABLES if os.environ.get(name)]
        why = (f"{named[0]}={os.environ[named[0]]}" if named else
               "one per core" if _wait["policy"] is not None else "torch's count")
    count = torch.get_num_threads()
    policy = _wait["policy"]
    wait = ("waiting threads sleep" if policy == "passive" else
            "waiting threads spin (torch was loaded before the rule could apply)" if policy is None
            else policy)
    if count == 1:
        wait = ""  # one thread never waits for another
    return f"{count} thread{'s' if count > 1 else ''}: {why}{', ' + wait if wait else ''}"


def check_count(value: str) -> int:
    """argparse type for --threads: a whole number from 1."""
    import argparse
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return count
