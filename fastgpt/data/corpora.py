"""Prepared text corpora: token files written once, memory-mapped, and random batches from them.

Two layouts, both read through memory maps and both batched by :func:`get_batch`:

- A cache of one text file: :func:`prepare_text` and :func:`prepare_default` tokenize a corpus once
  into ``train.bin`` / ``val.bin`` plus ``meta.json`` under a cache directory (the first
  ``1 - val_fraction`` of the tokens are training data) and reuse them while the source is
  unchanged; :class:`PreparedData`.
- A sharded corpus: a directory written by ``python -m fastgpt.prepare``
  (:func:`fastgpt.data.streaming.prepare_corpus`) holding ``train_NNNNNN.bin`` and ``val_NNNNNN.bin``
  shards and a ``meta.json`` that lists them; :func:`open_corpus` maps it as a :class:`ShardedCorpus`.

Token files hold little-endian uint16 ids (:data:`TOKEN_DTYPE`), so a tokenizer's ids must stay
below 65536.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_writer
from ._common import (CORPUS_FORMAT, CORPUS_VERSION, META_FILE, SPLITS, TOKEN_DTYPE, _check_int, _check_val_fraction, check_uint16_vocab)
from .tokenizers import Tokenizer, _given_kind, _new_tokenizer, tokenizer_from_dict

__all__ = ["PreparedData", "ShardedCorpus", "prepare_text", "prepare_default", "default_corpus_text",
           "open_corpus", "get_batch", "DEFAULT_CACHE_DIR", "TOKEN_DTYPE"]

DEFAULT_CACHE_DIR = "data_cache"
"""Where prepared token files go when no ``cache_dir`` is given (relative to the current directory)."""
# Bumped whenever the layout of the prepared files changes, so older caches are prepared again.
_CACHE_FORMAT = 1

def _check_split(name: str) -> str:
    if name not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {name!r}")
    return name


class _Splits:
    """What both layouts share: a tokenizer, and batches drawn from the shards of each split."""

    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.tokenizer.vocab_size

    def shards(self, split: str) -> list[np.ndarray]:
        """The token arrays of split ``"train"`` or ``"val"``."""
        raise NotImplementedError

    def num_tokens(self, split: str) -> int:
        """How many tokens split ``"train"`` or ``"val"`` holds."""
        return sum(len(s) for s in self.shards(split))

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`get_batch` on the shards of split ``"train"`` or ``"val"``."""
        return get_batch(self.shards(split), batch_size, block_size, generator, device)


@dataclass
class PreparedData(_Splits):
    """A tokenized text file on disk: ``train`` and ``val`` are read-only uint16 memmaps of token ids.

    ``meta`` is the content of ``meta.json`` (tokenizer, token counts, source description). A split
    with no tokens is an empty array rather than a memmap (an empty file cannot be mapped).
    """

    directory: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    meta: dict

    def split(self, name: str) -> np.ndarray:
        """The tokens of split ``"train"`` or ``"val"``."""
        return self.train if _check_split(name) == "train" else self.val

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's one token array, as a list."""
        return [self.split(split)]


@dataclass
class ShardedCorpus(_Splits):
    """A corpus prepared by ``python -m fastgpt.prepare``: each split a list of read-only uint16 memmaps.

    ``meta`` is the content of the directory's ``meta.json`` (tokenizer, counts per split and shard,
    sources); shards with no tokens are empty arrays.
    """

    directory: Path
    tokenizer: Tokenizer
    train: list[np.ndarray]
    val: list[np.ndarray]
    meta: dict

    def shards(self, split: str) -> list[np.ndarray]:
        """The shards of split ``"train"`` or ``"val"``, in order."""
        return self.train if _check_split(split) == "train" else self.val


def open_corpus(directory) -> ShardedCorpus:
    """Memory-map the corpus that ``python -m fastgpt.prepare`` wrote to ``directory``.

    Raises:
        ValueError: ``directory`` holds no ``meta.json`` (not a prepared corpus, or one whose
            preparation did not finish), or one of another format or version, or a shard is
            missing or has another size than ``meta.json`` records.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    directory = Path(directory)
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{directory} holds no {META_FILE}: it is not a corpus prepared by python -m "
                         "fastgpt.prepare, or its preparation did not finish (run it again)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_path} cannot be read as JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != CORPUS_FORMAT:
        raise ValueError(f"{meta_path} does not describe a corpus prepared by python -m fastgpt.prepare")
    if meta.get("version") != CORPUS_VERSION:
        raise ValueError(f"{meta_path} is corpus format version {meta.get('version')!r}; this fastgpt reads "
                         f"{CORPUS_VERSION}: prepare the corpus again")
    if meta.get("dtype") != TOKEN_DTYPE.str:
        raise ValueError(f"{meta_path} records token dtype {meta.get('dtype')!r}, not {TOKEN_DTYPE.str!r}")
    try:
        tokenizer = tokenizer_from_dict(meta["tokenizer"])
        splits = {split: _map_shards(directory, meta["splits"][split]) for split in SPLITS}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{meta_path} lacks or garbles an entry ({type(exc).__name__}: {exc})") from None
    return ShardedCorpus(directory=directory, tokenizer=tokenizer, meta=meta, **splits)


def _map_shards(directory: Path, entry: dict) -> list[np.ndarray]:
    """The memmaps of the shards that one split's ``meta.json`` entry lists."""
    shards = []
    for shard in entry["shards"]:
        name = shard["file"]
        if not isinstance(name, str) or Path(name).name != name:
            raise ValueError(f"{directory / META_FILE} names a shard {name!r} outside the directory")
        shards.append(_map_tokens(directory / name, shard["tokens"]))
    if sum(len(s) for s in shards) != entry["tokens"]:
        raise ValueError(f"the shards listed in {directory / META_FILE} hold {sum(len(s) for s in shards)} "
                         f"tokens, not the {entry['tokens']} it records")
    return shards


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
    check_uint16_vocab(tokenizer, source["source"])
    tokens = tokenizer.encode_array(text).astype(TOKEN_DTYPE)
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    directory.mkdir(parents=True, exist_ok=True)
    # meta.json is what marks a cache as valid. Removing it first means an interrupted run leaves a
    # directory that is prepared again, never token files trusted under an old description.
    (directory / "meta.json").unlink(missing_ok=True)
    for name, part in (("train", tokens[:n_train]), ("val", tokens[n_train:])):
        with atomic_writer(directory / f"{name}.bin") as f:
            f.write(memoryview(part))
    meta = {**key, **source, "tokenizer": tokenizer.to_dict(), "train_tokens": n_train, "val_tokens": n_val}
    with atomic_writer(directory / "meta.json") as f:
        f.write(json.dumps(meta, indent=2).encode("utf-8"))
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
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"bad token count {count!r} for {path}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f"token file {path} is missing") from None
    if size != TOKEN_DTYPE.itemsize * count:
        raise ValueError(f"{path} has {size} bytes, expected {TOKEN_DTYPE.itemsize * count} for {count} "
                         "uint16 tokens")
    if count == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(count,))


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




def _tokenizer_tag(tokenizer, kind: str) -> str:
    """Cache-directory suffix: the kind, plus a hash of a given vocabulary."""
    return kind if tokenizer is None else f"{kind}-{_short_hash(json.dumps(tokenizer.to_dict()))}"


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


def get_batch(split_tokens, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``block_size`` tokens and the same windows shifted by one.

    ``split_tokens`` is a 1-D integer array (an ``np.memmap``) or a list of them, the shards of a
    split. Every window lies inside one shard; each row's window is drawn uniformly from all the
    windows of all shards, so a shard is picked in proportion to its number of windows (its length
    minus ``block_size``) and shards shorter than ``block_size + 1`` are never picked. The draws
    come from ``generator`` (a CPU ``torch.Generator``) only, one integer per row, so restoring its
    state reproduces the batches. Returns int64 tensors ``x`` and ``y`` of shape
    (batch_size, block_size) on ``device``, with ``y[:, t] == x[:, t + 1]`` and ``y[:, -1]`` the
    token after the window.

    Raises:
        ValueError: no shard of the split has ``block_size + 1`` tokens.
    """
    shards = [split_tokens] if isinstance(split_tokens, np.ndarray) else split_tokens
    if not isinstance(shards, (list, tuple)):
        raise TypeError(f"split_tokens must be a numpy array (np.memmap) or a list of them, got "
                        f"{type(split_tokens).__name__}")
    for shard in shards:
        if not isinstance(shard, np.ndarray):
            raise TypeError(f"split_tokens must hold numpy arrays, got {type(shard).__name__}")
        if shard.ndim != 1 or not np.issubdtype(shard.dtype, np.integer):
            raise ValueError(f"split_tokens must be 1-D integer arrays, got shape {shard.shape} "
                             f"and dtype {shard.dtype}")
    batch_size = _check_int("batch_size", batch_size)
    block_size = _check_int("block_size", block_size)
    _check_generator(generator)
    windows = np.array([max(len(s) - block_size, 0) for s in shards], dtype=np.int64)  # starts per shard
    total = int(windows.sum())
    if total == 0:
        n = max((len(s) for s in shards), default=0)
        hint = f"use block_size <= {n - 1}" if n >= 2 else "use a longer corpus"
        what = f"the split has {n} tokens" if len(shards) <= 1 else f"the split's longest shard has {n} tokens"
        raise ValueError(f"{what}, too few for block_size={block_size} (a window needs block_size + 1 = "
                         f"{block_size + 1} tokens); {hint}")
    draws = torch.randint(total, (batch_size,), generator=generator).numpy()
    ends = np.cumsum(windows)
    which = np.searchsorted(ends, draws, side="right")  # the shard of each draw
    starts = draws - (ends[which] - windows[which])
    rows = np.stack([shards[k][s:s + block_size + 1] for k, s in zip(which.tolist(), starts.tolist())])
    rows = torch.from_numpy(rows.astype(np.int64))  # (B, block_size + 1)
    x = rows[:, :-1].contiguous()
    y = rows[:, 1:].contiguous()
    return _to_device(x, device), _to_device(y, device)


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned memory lets the copy overlap with the GPU work already queued.
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
