"""A held-out English corpus for the language model's generalisation check: six public-domain
books in their plain-text ebook editions, none of them part of anything the project trains on
(the `stdlib` config trains on the Python standard library's docs), tokenized into byte-level
shards by the project's own prepare command. The books are not in this repository:

    python profiling/heldout_corpus.py --books DIR --out DIR

DIR holds heart_of_darkness.txt (Conrad), pride_and_prejudice.txt (Austen),
great_expectations.txt (Dickens), walden.txt (Thoreau), dubliners.txt (Joyce) and
time_machine.txt (Wells), each a plain-text ebook with its "*** START OF" and "*** END OF"
marker lines. Each book is cut to the text between them (the licence header and footer
dropped), its byte-order mark removed and CRLF turned into LF, written to `<out>/text/`, and
checked against the digest of the text this project's figures were measured on. Then

    python -m noprop_fast.data.prepare --input <out>/text/*.txt --tokenizer byte --out <out>
        --val-tokens 200000 --no-progress

A .txt file is one document and the val shard takes whole documents from the first until it holds
200,000 tokens, so the val shard is Heart of Darkness alone and the train shard the other five:
3,167,037 bytes of text; val 213,940 tokens, train 2,953,103, byte vocabulary 257.
"""
import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

VAL_TOKENS = 200_000
# (book, the first 16 hex digits of the sha256 of its cleaned text): the first is the val shard
BOOKS = [
    ("heart_of_darkness", "56e2c3f429ebc19a"),
    ("pride_and_prejudice", "97acc34c1adc6ccf"),
    ("great_expectations", "b8ed36381a778163"),
    ("walden", "da5a69cc0ea65377"),
    ("dubliners", "1b626998d4b5b37a"),
    ("time_machine", "124084573ad7c355"),
]


def book_text(raw: bytes, name: str) -> str:
    """The book between its START and END marker lines, without BOM, with LF line ends."""
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("*** START OF")]
    ends = [i for i, line in enumerate(lines) if line.startswith("*** END OF")]
    if len(starts) != 1 or len(ends) != 1 or starts[0] >= ends[0]:
        sys.exit(f"{name}: no single pair of START/END marker lines")
    return "\n".join(lines[starts[0] + 1:ends[0]]).strip() + "\n"


def extract(books: Path, text: Path) -> list[Path]:
    """Write each book's cleaned text to `text`, checking its digest."""
    text.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (name, digest) in enumerate(BOOKS):
        source = books / f"{name}.txt"
        if not source.is_file():
            sys.exit(f"{source}: not found (--books must hold the six books named in --help)")
        cleaned = book_text(source.read_bytes(), name).encode("utf-8")
        found = hashlib.sha256(cleaned).hexdigest()[:16]
        if found != digest:
            print(f"{source}: another edition (sha256 {found}, measured on {digest}); the "
                  "figures will differ", file=sys.stderr)
        path = text / f"{index:02d}_{name}.txt"
        path.write_bytes(cleaned)
        files.append(path)
        print(f"{path} {len(cleaned):,} bytes")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--books", required=True, help="folder of the six books' ebook texts")
    parser.add_argument("--out", required=True, help="folder for the shards")
    args = parser.parse_args()
    files = extract(Path(args.books), Path(args.out) / "text")
    print(f"{len(files)} books, {sum(p.stat().st_size for p in files):,} bytes in all")
    command = [sys.executable, "-m", "noprop_fast.data.prepare", "--input", *map(str, files),
               "--tokenizer", "byte", "--out", args.out, "--val-tokens", str(VAL_TOKENS),
               "--no-progress"]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
