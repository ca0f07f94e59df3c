"""A held-out English corpus for the language model's generalisation check: six public-domain
Project Gutenberg books, none of them part of anything the project trains on (the `stdlib` config
trains on the Python standard library's docs), tokenized into byte-level shards by the project's
own prepare command.

    python profiling/heldout_corpus.py                 # into /work/heldout-corpus
    python profiling/heldout_corpus.py --out DIR --src DIR --repo GIT_DIR

The books are not the project's and are not in this repository: they are read out of a local
mirror (a bare git directory) of the public GitHub repository jhacksman/arxiv2025 at commit
8782bb4e8a336d6319ab47696bc17968ed7e54f4, under library/content/literature/ (the blobs below).
Each book is cut to the text between Gutenberg's "*** START OF" and "*** END OF" lines (the
licence header and footer dropped), its byte-order mark removed and CRLF turned into LF, and
written as `<src>/NN_<name>.txt`. Then

    python -m noprop_fast.data.prepare --input <src>/*.txt --tokenizer byte --out <out>
        --val-tokens 200000 --no-progress

A .txt file is one document and the val shard takes whole documents from the first until it holds
200,000 tokens, so the val shard is Heart of Darkness alone and the train shard the other five.
Built on 2 Dec 2025: 3,167,037 bytes of text; val 213,940 tokens (sha256 b3e7667d5eef...),
train 2,953,103 (sha256 83aebed177a8...), byte vocabulary 257.
"""
import argparse
import subprocess
import sys
from pathlib import Path

REPO = "/work/.mirror/jhacksman+arxiv2025/repo"
COMMIT = "8782bb4e8a336d6319ab47696bc17968ed7e54f4"
ROOT = "library/content/literature"
VAL_TOKENS = 200_000
# (file under ROOT, its git blob at COMMIT): the first one is the val shard.
BOOKS = [
    ("classics/heart_of_darkness.txt", "cb9738894e1d61533d1a6c7e47f76ec5cf0e598d"),
    ("classics/pride_and_prejudice.txt", "ef6d9b9a4791bb3e81defadacdf203c156f67a97"),
    ("classics/great_expectations.txt", "fa86a76eec333f27cc7babc275b5b37bf7e00b1c"),
    ("classics/walden.txt", "97e8a631e3b223e1d6c8bf7cc7427d469642e00e"),
    ("classics/dubliners.txt", "09001f6a8943765706a1c0f1d441e0614e8cb93a"),
    ("science_fiction/time_machine.txt", "9b6e2f5a2b97d0a8c9bd0bb514fe865a0bb89ad5"),
]


def book_text(raw: bytes, name: str) -> str:
    """The book between Gutenberg's START and END lines, without BOM, with LF line ends."""
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("*** START OF")]
    ends = [i for i, line in enumerate(lines) if line.startswith("*** END OF")]
    if len(starts) != 1 or len(ends) != 1 or starts[0] >= ends[0]:
        sys.exit(f"{name}: no single START/END pair of Gutenberg marker lines")
    return "\n".join(lines[starts[0] + 1:ends[0]]).strip() + "\n"


def extract(repo: str, src: Path) -> list[Path]:
    """Write each book's text to `src`, checking that the blob is the one recorded."""
    src.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (name, blob) in enumerate(BOOKS):
        spec = f"{COMMIT}:{ROOT}/{name}"
        found = subprocess.run(["git", "--git-dir", repo, "rev-parse", spec], check=True,
                               capture_output=True, text=True).stdout.strip()
        if found != blob:
            sys.exit(f"{spec}: blob {found}, expected {blob}")
        raw = subprocess.run(["git", "--git-dir", repo, "cat-file", "blob", blob], check=True,
                             capture_output=True).stdout
        path = src / f"{index:02d}_{Path(name).stem}.txt"
        path.write_text(book_text(raw, name), encoding="utf-8")
        files.append(path)
        print(f"{path} {path.stat().st_size:,} bytes (from {len(raw):,})")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/heldout-corpus", help="folder for the shards")
    parser.add_argument("--src", default="/work/heldout-src", help="folder for the books' text")
    parser.add_argument("--repo", default=REPO, help="the mirror's git directory")
    args = parser.parse_args()
    files = extract(args.repo, Path(args.src))
    print(f"{len(files)} books, {sum(p.stat().st_size for p in files):,} bytes in all")
    command = [sys.executable, "-m", "noprop_fast.data.prepare", "--input", *map(str, files),
               "--tokenizer", "byte", "--out", args.out, "--val-tokens", str(VAL_TOKENS),
               "--no-progress"]
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
