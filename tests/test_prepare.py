"""The embedded stdlib corpus (`data/corpus.py`) and the shard-preparing CLI (`data/prepare.py`).

Offline and CPU-only: the full corpus is built once per module (a few seconds); the CLI runs on
small local .txt/.jsonl/.parquet files with the byte tokenizer; FineWeb's network failure is
simulated by patching `datasets.load_dataset`.
"""
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from noprop_fast.data import corpus
from noprop_fast.data.corpus import corpus_documents, embedded_corpus_dir, is_val_document
from noprop_fast.data.prepare import main
from noprop_fast.data.shards import TokenData, read_header, read_shard
from noprop_fast.data.tokenizer import ByteTokenizer, get_tokenizer
from noprop_fast.errors import DataError
from hidden_packages import needs_datasets

EOT = ByteTokenizer.eot


def split_documents(tokens: np.ndarray) -> list[str]:
    """Byte tokens that start with EOT -> the documents between the EOTs, decoded."""
    tokens = np.asarray(tokens)
    assert len(tokens) and tokens[0] == EOT, "a shard of whole documents starts with EOT"
    starts = np.flatnonzero(tokens == EOT)
    ends = [*starts[1:], len(tokens)]
    return [bytes(tokens[s + 1:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, ends)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- the embedded corpus --------------------------------------------------------------------

@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(corpus_documents())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The real, full corpus, built once into a fresh cache."""
    return embedded_corpus_dir(cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_corpus_documents_are_long_unique_english_texts(documents):
    assert len(documents) > 1000
    assert len(set(documents)) == len(documents)
    assert all(isinstance(d, str) and len(d) >= corpus.MIN_DOCSTRING_CHARS for d in documents)
    words = " ".join(documents).lower().split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code or tables
    from pydoc_data.topics import topics
    assert topics["assert"].strip() in documents
    json_dumps = "Serialize ``obj`` to a JSON formatted ``str``."
    assert any(d.startswith(json_dumps) for d in documents)


def test_corpus_sources_skip_tests_idle_and_installed_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = corpus._stdlib_sources()
    assert root / "json" / "__init__.py" in sources
    assert sources == sorted(sources)
    for path in sources:
        assert not corpus.SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]), path


def test_embedded_corpus_shards(built, documents):
    assert built.name.startswith("stdlib-corpus-py") and built.parent.name == "noprop_fast"
    infos = {p.name: read_header(p) for p in built.iterdir()}
    assert set(infos) == {"stdlib_train_000001.bin", "stdlib_val_000000.bin"}  # nothing else left
    for info in infos.values():
        assert (info.tokenizer, info.vocab_size) == ("byte", 257)
    train = split_documents(read_shard(built / "stdlib_train_000001.bin"))
    val = split_documents(read_shard(built / "stdlib_val_000000.bin"))
    assert not set(train) & set(val)
    assert all(not is_val_document(d) for d in train) and all(is_val_document(d) for d in val)
    assert sorted(train + val) == sorted(documents)  # every document once, none cut
    assert 0.05 < len(val) / len(documents) < 0.15
    data = TokenData.load(built)
    assert data.tokenizer == "byte" and data.num_tokens("val") > 50_000


def test_embedded_corpus_is_reused_not_rebuilt(built, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert embedded_corpus_dir(cache_dir=built.parent.parent, progress=True) == built
    assert capsys.readouterr().err == ""
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before


SMALL = [f"document {i}: " + "some English words in a sentence. " * (i % 7 + 1) for i in range(60)]


@pytest.fixture
def small_corpus(monkeypatch):
    """A 60-document stand-in for the stdlib, for the cache mechanics."""
    assert any(map(is_val_document, SMALL)) and not all(map(is_val_document, SMALL))
    monkeypatch.setattr(corpus, "corpus_documents", lambda: iter(SMALL))


def test_cache_root_from_the_environment(small_corpus, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("NOPROP_FAST_CACHE", str(tmp_path / "nf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = embedded_corpus_dir()
    assert folder.parent == tmp_path / "nf" / "noprop_fast"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("building the embedded corpus")
    assert "60 documents" in err[1]
    monkeypatch.delenv("NOPROP_FAST_CACHE")
    assert embedded_corpus_dir(progress=False).parent == tmp_path / "xdg" / "noprop_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "noprop_fast"
    assert embedded_corpus_dir(progress=False).parent == home_cache


def test_a_crash_while_building_leaves_nothing(small_corpus, monkeypatch, tmp_path):
    def crash(folder):
        (folder / "stdlib_val_000000.bin").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded_corpus_dir(cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "noprop_fast").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(corpus, "corpus_documents", lambda: iter(SMALL))
    folder = embedded_corpus_dir(cache_dir=tmp_path, progress=False)
    assert len(split_documents(read_shard(folder / "stdlib_train_000001.bin"))) > 0


def test_two_builders_at_once_both_end_with_the_folder(small_corpus, monkeypatch, tmp_path):
    real_build = corpus._build

    def build_while_another_process_finishes_first(folder):
        sizes = real_build(folder)
        shutil.copytree(folder, folder.parent / f"stdlib-corpus-{corpus.corpus_key()}")
        return sizes
    monkeypatch.setattr(corpus, "_build", build_while_another_process_finishes_first)
    folder = embedded_corpus_dir(cache_dir=tmp_path, progress=False)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # our copy was dropped
    assert read_header(folder / "stdlib_val_000000.bin").tokenizer == "byte"


def test_an_unwritable_cache_is_one_line(small_corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="NOPROP_FAST_CACHE"):
        embedded_corpus_dir(cache_dir=blocker, progress=False)


# ---- the prepare CLI -------------------------------------------------------------------------

@pytest.fixture
def inputs(tmp_path) -> tuple[list[Path], list[str]]:
    """A .txt (one document), a .jsonl and a .parquet; returns the files and their documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "src"
    src.mkdir()
    txt = "A whole text file is one document.\n\nIt keeps its blank lines, and its é and 🙂.\n"
    (src / "a.txt").write_text(txt, encoding="utf-8")
    records = [f"record {i}: " + "json text " * (i + 1) for i in range(12)]
    (src / "b.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n"
                                         for i, r in enumerate(records)), encoding="utf-8")
    rows = [f"row {i}: " + "parquet text " * (2 * i + 1) for i in range(9)]
    pq.write_table(pa.table({"text": rows, "n": list(range(9))}), src / "c.parquet")
    return [src / "a.txt", src / "b.jsonl", src / "c.parquet"], [txt, *records, *rows]


@needs_datasets
def test_prepare_local_files(inputs, tmp_path, capsys):
    files, texts = inputs
    out = tmp_path / "out"
    argv = ["--out", str(out), "--input", *map(str, files), "--tokenizer", "byte",
            "--val-tokens", "300", "--shard-tokens", "500", "--no-progress"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    train_names = [f"data_train_{i:06d}.bin" for i in range(1, len(names))]
    assert names == sorted(["data_val_000000.bin", *train_names])
    infos = [read_header(out / n) for n in ["data_val_000000.bin", *train_names]]
    assert all((i.tokenizer, i.vocab_size) == ("byte", 257) for i in infos)
    assert all(i.num_tokens == 500 for i in infos[1:-1]) and 0 < infos[-1].num_tokens <= 500
    expected_tokens = sum(1 + len(t.encode("utf-8")) for t in texts)
    assert sum(i.num_tokens for i in infos) == expected_tokens
    val = split_documents(read_shard(out / "data_val_000000.bin"))
    assert val == texts[:len(val)]  # whole documents, the first ones, just past 300 tokens
    val_tokens = infos[0].num_tokens
    assert val_tokens >= 300 and val_tokens - 1 - len(val[-1].encode()) < 300
    train = np.concatenate([read_shard(out / n) for n in train_names])
    assert split_documents(train) == texts[len(val):]
    assert TokenData.load(out).num_tokens("train") == expected_tokens - val_tokens
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1 and f"{len(names)} shards" in stdout[0]
    assert f"data_val_000000.bin {val_tokens:,}" in stdout[0]


@needs_datasets
def test_prepare_glob_prefix_and_max_tokens(inputs, tmp_path):
    files, texts = inputs
    out = tmp_path / "out"
    pattern = str(files[0].parent / "*.jsonl")
    assert main(["--out", str(out), "--input", pattern, "--tokenizer", "byte", "--prefix", "mine",
                 "--val-tokens", "50", "--shard-tokens", "100", "--max-tokens", "250"]) == 0
    infos = [read_header(p) for p in sorted(out.iterdir())]
    assert [i.path.name for i in infos][-1] == "mine_val_000000.bin"
    assert sum(i.num_tokens for i in infos) == 250  # the last document is cut at the limit
    train = np.concatenate([read_shard(out / f"mine_train_{i:06d}.bin") for i in (1, 2)])
    val = split_documents(read_shard(out / "mine_val_000000.bin"))
    jsonl = texts[1:13]
    stream = "".join(f"\0{t}" for t in jsonl[len(val):]).encode()
    assert bytes(np.where(train == EOT, 0, train).astype(np.uint8)) == stream[:len(train)]


@needs_datasets
def test_ctrl_c_leaves_only_complete_shards(inputs, tmp_path, monkeypatch, capsys):
    import datasets
    files, _ = inputs
    many = files[0].parent / "many.jsonl"  # > 2 batches of documents go through before Ctrl-C
    many.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(600)))
    real_load = datasets.load_dataset

    def interrupted(*args, **kwargs):
        if kwargs["data_files"] == [str(files[2])]:
            raise KeyboardInterrupt
        return real_load(*args, **kwargs)
    monkeypatch.setattr(datasets, "load_dataset", interrupted)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--input", str(many), str(files[2]), "--tokenizer", "byte",
                 "--val-tokens", "100", "--shard-tokens", "1000"]) == 130
    assert "interrupted" in capsys.readouterr().err
    shards = sorted(out.iterdir())
    names = [p.name for p in shards]
    assert names[-1] == "data_val_000000.bin" and "data_train_000001.bin" in names
    for path in shards:  # no temp file, no partial shard: every file is a full, valid shard
        info = read_header(path)
        assert "train" not in path.name or info.num_tokens == 1000


@pytest.mark.parametrize("case, expected", [
    ("nomatch", "no file matches"),
    ("missing", "no such file"),
    ("extension", "unknown extension '.csv'"),
    pytest.param("field", "no field 'text'", marks=needs_datasets),
    pytest.param("too-small", "lower --val-tokens", marks=needs_datasets),
    ("occupied", "already holds shards"),
    ("undecodable", "UnicodeDecodeError"),
    ("max-below-val", "must exceed --val-tokens"),
])
def test_prepare_errors_are_one_line(case, expected, inputs, tmp_path, capsys):
    files, _ = inputs
    src = files[0].parent
    (src / "x.csv").write_text("text\nhello\n")
    (src / "y.jsonl").write_text(json.dumps({"content": "no text field here"}) + "\n")
    (src / "z.txt").write_bytes(b"Latin-1, not UTF-8: caf\xe9\n")
    out = tmp_path / "out"
    given = {"nomatch": [str(src / "*.nothing")], "missing": [str(src / "gone.txt")],
             "extension": [str(src / "x.csv")], "field": [str(src / "y.jsonl")],
             "too-small": [str(files[0])], "occupied": [str(files[0])],
             "max-below-val": [str(files[0])], "undecodable": [str(src / "z.txt")]}[case]
    extra = {"max-below-val": ["--max-tokens", "10"]}.get(case, [])
    if case == "occupied":
        out.mkdir()
        (out / "fineweb_val_000000.bin").write_bytes(b"")
    assert main(["--out", str(out), "--input", *given, "--tokenizer", "byte", *extra]) != 0
    assert expected in one_error_line(capsys)
    if case != "occupied":
        assert not out.exists()  # nothing written, not even the folder


@needs_datasets
def test_text_files_read_as_the_datasets_text_loader_reads_them(tmp_path):
    """.txt/.md files are read without `datasets`, each one document, and give the same text as
    its text loader did: UTF-8, CRLF and lone CR as LF, a byte-order mark kept, empty files none."""
    import datasets
    from noprop_fast.data.prepare import file_texts
    contents = [b"\xef\xbb\xbfBOM first,\r\nCRLF,\rCR, caf\xc3\xa9\n\n\nend", b"",
                "# Title\n\n\u00e9 \U0001f642\n".encode()]
    files = []
    for i, (raw, ext) in enumerate(zip(contents, (".txt", ".txt", ".md"))):
        files.append(tmp_path / f"{i}{ext}")
        files[-1].write_bytes(raw)
    expected = [row["text"] for path in files
                for row in datasets.load_dataset("text", data_files=[str(path)], split="train",
                                                 streaming=True, sample_by="document")
                if row["text"]]
    assert list(file_texts(files, "ignored")) == expected
    assert expected[0] == "\ufeffBOM first,\nCRLF,\nCR, caf\u00e9\n\n\nend" and len(expected) == 2


def test_gpt2_unavailable_is_one_line(inputs, tmp_path, capsys):
    try:
        get_tokenizer("gpt2")
        pytest.skip("the GPT-2 tokenizer is available here")
    except DataError:
        pass
    files, _ = inputs
    assert main(["--out", str(tmp_path / "out"), "--input", str(files[0])]) != 0
    assert "--tokenizer byte" in one_error_line(capsys)


@needs_datasets
def test_fineweb_without_network_is_one_line(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        assert args[0] == "HuggingFaceFW/fineweb" and kwargs["name"] == "sample-10BT"
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub\n(offline)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["--out", str(tmp_path / "out"), "--tokenizer", "byte"]) != 0
    line = one_error_line(capsys)
    assert "network" in line and "--input" in line and "ConnectionError" in line
    assert not (tmp_path / "out").exists()
