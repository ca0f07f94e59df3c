"""Token shards, tokenizers and the language model's batches.

Shards from other writers are written here with plain numpy (a 256-int32 header, then uint16 ids),
independently of `write_shard`. Window contents are checked against the source array: the sources
are arange-like, so each token value names its position and a window names its start.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noprop_fast.data.shards import (
    HEADER_INTS,
    MAGIC,
    TOKENIZER_CODES,
    VERSION,
    ShardInfo,
    TokenBatches,
    TokenData,
    find_shards,
    read_header,
    read_shard,
    unigram_entropy,
    val_batches,
    write_shard,
)
from noprop_fast.data.tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer
from noprop_fast.errors import ConfigError, DataError
from helpers import raises_one_line


def write_plain(path, ids, magic=MAGIC, version=VERSION, count=None, code=0, vocab=0):
    """An independent writer in the published shards' way: zeros(256, int32) header, then uint16 ids."""
    ids = np.asarray(ids, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:5] = magic, version, len(ids) if count is None else count, code, vocab
    with open(path, "wb") as f:
        header.tofile(f)
        ids.tofile(f)


# ---------------------------------------------------------------- round trips


@settings(deadline=None, max_examples=40)
@given(
    tokenizer=st.sampled_from(["gpt2", "byte"]),
    explicit_vocab=st.booleans(),
    data=st.data(),
)
def test_write_read_round_trip(tokenizer, explicit_vocab, data):
    default = {"gpt2": 50257, "byte": 257}[tokenizer]
    vocab = data.draw(st.integers(1, 65536)) if explicit_vocab else None
    bound = default if vocab is None else vocab
    ids = data.draw(st.lists(st.integers(0, bound - 1), min_size=0, max_size=300))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x_train_000000.bin"
        written = write_shard(path, ids, tokenizer=tokenizer, vocab_size=vocab)
        assert written == ShardInfo(path, len(ids), tokenizer, bound)
        assert read_header(path) == written
        assert path.stat().st_size == 4 * HEADER_INTS + 2 * len(ids)
        got = read_shard(path)
        assert got.dtype == np.uint16 and got.shape == (len(ids),)
        assert got.tolist() == ids
        assert [p.name for p in Path(folder).iterdir()] == [path.name]  # no temp file left behind


def test_round_trip_full_uint16_range(tmp_path):
    ids = np.array([0, 1, 65534, 65535, 40000], dtype=np.int64)
    info = write_shard(tmp_path / "a.bin", ids, tokenizer="byte", vocab_size=65536)
    assert (info.num_tokens, info.vocab_size) == (5, 65536)
    assert read_shard(tmp_path / "a.bin").tolist() == ids.tolist()
    raises_one_line(lambda: write_shard(tmp_path / "b.bin", [1], vocab_size=65537), "65537", error=ConfigError)


def test_empty_shard_reads(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_header(tmp_path / "e.bin").num_tokens == 0
    assert read_shard(tmp_path / "e.bin").shape == (0,)


def test_write_rejects_out_of_vocab_and_keeps_old_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3], tokenizer="byte")
    raises_one_line(lambda: write_shard(path, [5, 257, 3], tokenizer="byte"), path, "257", "index 1")
    raises_one_line(lambda: write_shard(path, [5, -1], tokenizer="byte"), path, "-1", "index 1")
    assert read_shard(path).tolist() == [1, 2, 3]


def test_fineweb_shards_from_another_writer(tmp_path):
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = [np.r_[50256, rng.integers(0, 50257, 999)], np.r_[50256, rng.integers(0, 50257, 500)]]
    val = np.r_[50256, rng.integers(0, 50256, 300), 50256, 17]
    write_plain(folder / "fineweb_train_000002.bin", train[1])
    write_plain(folder / "fineweb_train_000001.bin", train[0])
    write_plain(folder / "fineweb_val_000000.bin", val)
    assert [p.name for p in find_shards(folder, "train")] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    data = TokenData.load(folder)
    assert (data.tokenizer, data.vocab_size) == ("gpt2", 50257)
    assert [s.tolist() for s in data.train] == [t.tolist() for t in train]
    assert [s.tolist() for s in data.val] == [val.tolist()]
    assert (data.num_tokens("train"), data.num_tokens("val")) == (1501, 303)
    assert "fineweb10B" in data.source and "gpt2" in data.source


# ---------------------------------------------------------------- faults


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "d_train_000000.bin"
    write_shard(path, np.arange(100) % 257, tokenizer="byte")
    return path


def test_bad_magic(good):
    write_plain(good, [1, 2], magic=12345)
    raises_one_line(lambda: read_header(good), good, "bad magic 12345", str(MAGIC))


def test_bad_version(good):
    write_plain(good, [1, 2], version=2)
    raises_one_line(lambda: read_shard(good), good, "version 2")


def test_truncated_file(good):
    size = good.stat().st_size
    with open(good, "r+b") as f:
        f.truncate(size - 3)
    needles = (good, f"size {size - 3} bytes", f"{size} bytes", "100 tokens", "truncated")
    raises_one_line(lambda: read_shard(good), *needles)


def test_file_longer_than_header_says(good):
    with open(good, "ab") as f:
        f.write(b"\0\0")
    raises_one_line(lambda: read_header(good), good, "2 bytes more")


def test_shorter_than_header(good):
    good.write_bytes(b"\x00" * 100)
    raises_one_line(lambda: read_header(good), good, "100 bytes", "1024-byte header")


def test_missing_file(tmp_path):
    raises_one_line(lambda: read_header(tmp_path / "nope.bin"), "nope.bin", "no such file")


def test_unknown_tokenizer_code(good):
    write_plain(good, [1], code=7)
    raises_one_line(lambda: read_header(good), good, "tokenizer code 7")


def test_out_of_vocab_ids(good):
    write_plain(good, [3, 255, 256, 300, 1000], code=TOKENIZER_CODES["byte"])
    raises_one_line(lambda: read_shard(good), good, "token id 300 at index 3", "257")
    raises_one_line(lambda: read_shard(good, vocab_size=256), "token id 256 at index 2")
    assert read_shard(good, vocab_size=1001).tolist() == [3, 255, 256, 300, 1000]


def test_missing_folder_and_no_shards(tmp_path):
    raises_one_line(lambda: TokenData.load(tmp_path / "absent"), "absent", "no such folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    raises_one_line(lambda: find_shards(tmp_path / "empty", "val"), "empty", "*_val_*.bin")
    nested = tmp_path / "outer" / "fineweb10B"
    nested.mkdir(parents=True)
    write_plain(nested / "fineweb_train_000001.bin", [1, 2])
    raises_one_line(lambda: find_shards(tmp_path / "outer", "train"), "*_train_*.bin", "fineweb10B")
    raises_one_line(lambda: TokenData.load(nested), "*_val_*.bin")  # train present, val missing


def test_mixed_tokenizers(tmp_path):
    write_shard(tmp_path / "c_train_000000.bin", [1, 2, 3], tokenizer="gpt2")
    write_shard(tmp_path / "c_val_000000.bin", [1, 2, 3], tokenizer="byte")
    raises_one_line(
        lambda: TokenData.load(tmp_path), "c_val_000000.bin", "c_train_000000.bin", "byte", "gpt2"
    )
    write_shard(tmp_path / "c_val_000000.bin", [1, 2, 3], tokenizer="gpt2", vocab_size=50304)
    raises_one_line(lambda: TokenData.load(tmp_path), "c_val_000000.bin", "50304", "50257")


# ---------------------------------------------------------------- training batches


def split_source(n, pieces):
    """Token values 0..n-1 (position = value) cut into shards of uneven sizes, one of them empty."""
    src = np.arange(n, dtype=np.uint16)
    cuts = sorted(np.random.default_rng(n).choice(np.arange(1, n), pieces - 1, replace=False).tolist())
    shards = np.split(src, cuts)
    return src, shards[:1] + [src[:0]] + shards[1:]


def draw(batches, count):
    return [batches.next() for _ in range(count)]


@settings(deadline=None, max_examples=25)
@given(n=st.integers(2, 3000), seq_len=st.integers(1, 64), batch=st.integers(1, 9), pieces=st.integers(1, 5))
def test_windows_match_the_source(n, seq_len, batch, pieces):
    if n < seq_len + 1:
        n = seq_len + 1
    src, shards = split_source(n, min(pieces, n - 1))
    stream = TokenBatches(shards, batch, seq_len, "cpu", seed=n)
    for x, y in draw(stream, 3):
        assert x.shape == y.shape == (batch, seq_len) and x.dtype == y.dtype == torch.int64
        for xr, yr in zip(x.numpy(), y.numpy()):
            start = int(xr[0])
            assert (xr == src[start : start + seq_len]).all()
            assert (yr == src[start + 1 : start + seq_len + 1]).all()


def test_epoch_windows_are_a_disjoint_grid():
    src, shards = split_source(1000, 4)
    stream = TokenBatches(shards, 1, 16, "cpu", seed=3)
    assert stream.windows_per_epoch == (999 // 16) - 1
    offsets = set()
    for epoch in range(4):
        starts = np.sort(np.concatenate([x[:, 0].numpy() for x, _ in draw(stream, stream.windows_per_epoch)]))
        assert (np.diff(starts) == 16).all()  # one offset, consecutive windows share no token of x or y
        assert stream.epoch == epoch and len(starts) == stream.windows_per_epoch
        offsets.add(int(starts[0]) % 16)
    assert len(offsets) > 1  # the grid moves between epochs


def test_seeds_reproduce_and_differ():
    _, shards = split_source(5000, 3)
    a, b, c = (TokenBatches(shards, 4, 32, "cpu", seed=s) for s in (7, 7, 8))
    xa, xb, xc = (torch.cat([x for x, _ in draw(s, 10)]) for s in (a, b, c))
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_resume_continues_the_stream():
    _, shards = split_source(700, 2)
    first = TokenBatches(shards, 3, 8, "cpu", seed=11)
    draw(first, 40)  # past the first epoch (85 windows)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = draw(first, 50)
    resumed = TokenBatches(shards, 3, 8, "cpu", seed=999)
    resumed.load_state_dict(state)
    for (xe, ye), (xr, yr) in zip(expected, draw(resumed, 50)):
        assert torch.equal(xe, xr) and torch.equal(ye, yr)
    other = TokenBatches(shards, 3, 16, "cpu")
    raises_one_line(lambda: other.load_state_dict(state), "seq_len", error=ConfigError)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_disjoint_windows(world_size):
    _, shards = split_source(2000, 3)
    single = TokenBatches(shards, 1, 10, "cpu", seed=5)
    epoch_starts = [int(x[0, 0]) for x, _ in draw(single, single.windows_per_epoch)]
    ranks = [TokenBatches(shards, 2, 10, "cpu", seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = ranks[0].windows_per_epoch
    assert per_rank == len(epoch_starts) // world_size
    seen = [[int(v) for x, _ in draw(r, per_rank // 2) for v in x[:, 0]] for r in ranks]
    flat = [s for rank_starts in seen for s in rank_starts]
    assert len(set(flat)) == len(flat)  # disjoint across ranks
    assert set(flat) <= set(epoch_starts[: per_rank * world_size])  # the single-process epoch's windows


def test_too_few_tokens():
    raises_one_line(lambda: TokenBatches([np.arange(8)], 2, 8, "cpu"), "train split", "8 tokens", "9")
    raises_one_line(lambda: val_batches([np.arange(5), np.arange(3)], 2, 8, "cpu"), "val split", "8 tokens", "9")
    raises_one_line(lambda: TokenBatches([np.arange(30)], 2, 8, "cpu", world_size=4), "fewer than the 4 processes")
    only_one = TokenBatches([np.arange(12)], 3, 8, "cpu", seed=1)  # 1 window, offset 0..3
    x, y = only_one.next()
    assert x.shape == (3, 8) and {int(v) for v in x[:, 0]} <= {0, 1, 2, 3}


# ---------------------------------------------------------------- validation batches


@settings(deadline=None, max_examples=25)
@given(n=st.integers(2, 2000), seq_len=st.integers(1, 40), batch=st.integers(1, 7), limit=st.integers(0, 2000))
def test_val_batches_cover_in_order(n, seq_len, batch, limit):
    n = max(n, seq_len + 1)
    src, shards = split_source(n, min(3, n - 1))
    max_tokens = limit if limit >= seq_len else None
    xs, ys = zip(*val_batches(shards, batch, seq_len, "cpu", max_tokens=max_tokens))
    assert all(x.shape[0] <= batch for x in xs) and all(x.shape[0] == batch for x in xs[:-1])
    x, y = torch.cat(xs).reshape(-1).numpy(), torch.cat(ys).reshape(-1).numpy()
    windows = (n - 1) // seq_len if max_tokens is None else min((n - 1) // seq_len, max_tokens // seq_len)
    assert (x == src[: windows * seq_len]).all() and (y == src[1 : windows * seq_len + 1]).all()
    assert max_tokens is None or len(y) <= max_tokens


@pytest.mark.parametrize("world_size", [2, 3])
def test_val_shares_are_disjoint_and_equal(world_size):
    src, shards = split_source(1000, 3)
    shares = [
        torch.cat([y for _, y in val_batches(shards, 4, 10, "cpu", rank=r, world_size=world_size)]).reshape(-1)
        for r in range(world_size)
    ]
    assert len({len(s) for s in shares}) == 1
    together = torch.cat(shares).numpy()
    assert (together == src[1 : len(together) + 1]).all()  # disjoint, in order, rank by rank
    assert len(together) == (99 // world_size) * world_size * 10


def test_val_max_tokens_below_one_window():
    raises_one_line(lambda: val_batches([np.arange(100)], 2, 10, "cpu", max_tokens=9), "max_tokens", error=ConfigError)


# ---------------------------------------------------------------- entropy and tokenizers


def test_unigram_entropy_by_hand():
    tokens = np.array([0, 0, 1, 3], dtype=np.uint16)  # p = 1/2, 1/4, 1/4
    assert math.isclose(unigram_entropy(tokens, 5), 1.5 * math.log(2), rel_tol=1e-12)
    assert unigram_entropy(np.full(10, 4, dtype=np.uint16), 5) == 0.0
    assert math.isclose(unigram_entropy(np.arange(256) % 16, 16), math.log(16), rel_tol=1e-12)


@settings(deadline=None, max_examples=60)
@given(texts=st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_byte_tokenizer_round_trip(texts):
    tok = ByteTokenizer()
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    joined = [i for text in texts for i in [tok.eot] + tok.encode(text)]
    assert tok.decode(joined) == "".join("\n\n" + t for t in texts)


def test_byte_tokenizer_details():
    tok = get_tokenizer("byte")
    assert (tok.name, tok.vocab_size, tok.eot) == ("byte", 257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3, 256, 0x41]) == "\ufffd\n\nA"  # a cut character is replaced, not an error
    raises_one_line(lambda: get_tokenizer("bpe"), "bpe", error=ConfigError)


def _gpt2_loads():
    try:
        GPT2Tokenizer()
        return True
    except DataError:
        return False


def test_gpt2_unavailable_is_one_line():
    if _gpt2_loads():
        pytest.skip("tiktoken loads the GPT-2 encoding here")
    raises_one_line(lambda: get_tokenizer("gpt2"), "pip install tiktoken", "--tokenizer byte")


def test_gpt2_round_trip():
    if not _gpt2_loads():
        pytest.skip("tiktoken or its GPT-2 vocabulary is not available")
    tok = get_tokenizer("gpt2")
    ids = tok.encode("Hello world <|endoftext|>")
    assert tok.eot not in ids and tok.decode(ids) == "Hello world <|endoftext|>"
    assert tok.decode([tok.eot] + tok.encode("a")) == "\n\na"
