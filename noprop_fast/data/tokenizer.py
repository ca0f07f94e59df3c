"""Tokenizers for the language model: UTF-8 bytes (always available) and GPT-2 (through tiktoken).

    byte   ids 0..255 are the bytes of the UTF-8 encoding, 256 is end-of-text (EOT): 257 ids.
           Needs nothing, works offline, and any text round-trips exactly.
    gpt2   the GPT-2 BPE of published FineWeb token shards: 50257 ids, EOT = 50256. Loaded through
           `tiktoken`, an optional dependency that downloads the vocabulary on first use.

EOT starts each document in a shard (the writer puts it there, not `encode`). `decode` renders EOT
as a blank line ("\n\n") so that a sample of several documents reads as separate paragraphs.
"""

from __future__ import annotations

from collections.abc import Iterable

from noprop_fast.errors import ConfigError, DataError

TOKENIZERS = ("gpt2", "byte")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus EOT = 256."""

    name = "byte"
    vocab_size = 257
    eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; EOT becomes "\n\n", invalid UTF-8 (a sample cut mid-character, a
        model's stray byte) becomes U+FFFD instead of an error."""
        pieces, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot:
                pieces.append(run.decode("utf-8", errors="replace") + "\n\n")
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..256)")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken; a one-line DataError when tiktoken or its vocabulary is missing."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self):
        try:
            import tiktoken

            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # ImportError, or no network for the first download (many kinds)
            reason = " ".join(str(e).split())[:160] or type(e).__name__
            error = DataError(
                "the GPT-2 tokenizer needs `pip install tiktoken` and, the first time, a network "
                f"connection to fetch its vocabulary ({type(e).__name__}: {reason}); "
                "use --tokenizer byte to work offline"
            )
            error.reason = f"{type(e).__name__}: {reason}"  # for callers with other advice
            raise error from None

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" inside a document is plain text, never the EOT id.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text, EOT as "\n\n" (as ByteTokenizer does); invalid UTF-8 is replaced."""
        pieces, run = [], []
        for i in ids:
            i = int(i)
            if i == self.eot:
                pieces.append(self._enc.decode(run, errors="replace") + "\n\n")
                run = []
            else:
                run.append(i)
        pieces.append(self._enc.decode(run, errors="replace"))
        return "".join(pieces)


def get_tokenizer(name: str) -> ByteTokenizer | GPT2Tokenizer:
    """"byte" or "gpt2"; ConfigError for another name, DataError when GPT-2 cannot be loaded."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ConfigError(f"unknown tokenizer {name!r}, expected one of: {', '.join(TOKENIZERS)}")
