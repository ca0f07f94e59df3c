"""Tokenizers for the language model: `byte` (UTF-8 bytes 0..255 and EOT = 256: 257 ids; needs
nothing, any text round-trips) and `gpt2` (the BPE of published FineWeb shards: 50257 ids, EOT =
50256, through the optional `tiktoken`, which downloads its vocabulary on first use). The shard
writer puts EOT before each document; `decode` renders it as a blank line ("\n\n").
"""

from collections.abc import Iterable

from noprop_fast.errors import ConfigError, DataError

TOKENIZERS = ("gpt2", "byte")


def _between_eots(ids: Iterable[int], eot: int) -> list[list[int]]:
    """The runs of ids between EOTs (a decoded EOT is the blank line that joins them)."""
    runs = [[]]
    for i in map(int, ids):
        if i == eot:
            runs.append([])
        else:
            runs[-1].append(i)
    return runs


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
        runs = _between_eots(ids, self.eot)
        bad = next((i for run in runs for i in run if not 0 <= i < 256), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the byte vocabulary (0..256)")
        return "\n\n".join(bytes(run).decode("utf-8", errors="replace") for run in runs)


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
            error = DataError("the GPT-2 tokenizer needs `pip install tiktoken` and, the first "
                              "time, a network connection to fetch its vocabulary "
                              f"({type(e).__name__}: {reason}); use --tokenizer byte to work "
                              "offline")
            error.reason = f"{type(e).__name__}: {reason}"  # for callers with other advice
            raise error from None

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" inside a document is plain text, never the EOT id.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text, EOT as "\n\n" (as ByteTokenizer does); invalid UTF-8 is replaced."""
        runs = _between_eots(ids, self.eot)
        return "\n\n".join(self._enc.decode(run, errors="replace") for run in runs)


def get_tokenizer(name: str) -> ByteTokenizer | GPT2Tokenizer:
    """"byte" or "gpt2"; ConfigError for another name, DataError when GPT-2 cannot be loaded."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer()
    raise ConfigError(f"unknown tokenizer {name!r}, expected one of: {', '.join(TOKENIZERS)}")
