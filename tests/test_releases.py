"""The configurations that differ by Triton release (kernels/releases.py): every replacement names
a configuration a kernel file asks for and has its shape, and the installed release picks the
tables the launchers and the ahead-of-time specs then use."""
import pytest

pytest.importorskip("triton")

from noprop_fast.kernels import releases  # noqa: E402
from noprop_fast.kernels.aot import all_specs  # noqa: E402


def shape(config):
    """A configuration's structure: the nesting and lengths of its tuples and lists."""
    if isinstance(config, (tuple, list)):
        return type(config).__name__, tuple(shape(c) for c in config)
    return type(config).__name__


def test_every_replacement_is_asked_for_and_shaped_like_the_current_one():
    all_specs()  # imports every kernel file, each asking for its configurations
    stale = set(releases.OLDER) - set(releases.ASKED)
    assert not stale, f"replacements no kernel file asks for: {sorted(map(str, stale))}"
    for where, older in releases.OLDER.items():
        current = releases.ASKED[where]
        if isinstance(current, list):  # a list of tiles: each tile shaped like the current ones
            assert older and {shape(t) for t in older} == {shape(t) for t in current}, where
        else:
            assert shape(older) == shape(current), where


def test_the_installed_release_picks_the_tables():
    from noprop_fast.kernels import attention, block_linear
    all_specs()
    assert releases.USES_OLDER == (releases.TRITON_RELEASE < (3, 9))
    for (kernel, key), current in releases.ASKED.items():
        want = releases.OLDER.get((kernel, key), current) if releases.USES_OLDER else current
        assert releases.for_release(kernel, key, current) == want
    for (kernel, key), older in releases.OLDER.items():
        if kernel == "attention":
            chosen = attention._CONFIGS[key]
            assert chosen == (older if releases.USES_OLDER else releases.ASKED[kernel, key])
    tiles = block_linear._FP32_TILES
    assert tiles == (releases.OLDER["block_linear", "fp32_tiles"] if releases.USES_OLDER
                     else releases.ASKED["block_linear", "fp32_tiles"])
    specs = {s.name for s in all_specs() if s.name.startswith("block_linear_fwd_fp32")}
    assert specs == {f"block_linear_fwd_fp32[{m}x{n}x{k},w{w},s{s}]" for m, n, k, w, s in tiles}
