"""Corpora too big for memory: text streamed from files into sharded uint16 token files.

:func:`prepare_corpus` is ``python -m fastgpt.prepare``; :func:`fastgpt.data.open_corpus` reads
what it writes.

Sources are files, directories (searched recursively) and glob patterns. A ``.txt`` or ``.md``
file is one document; a ``.jsonl`` file holds one document per line, a JSON object whose
``text_field`` is the text (blank lines are skipped); each may be gzip-compressed (``.txt.gz``,
``.md.gz``, ``.jsonl.gz``). A ``.parquet`` file (as the Hugging Face Hub serves FineWeb) holds one
document per row, in the string column ``text_field``; it needs pyarrow (``fastgpt[parquet]``).
Files are taken in the order the sources are given, the files of a
directory or a glob sorted by path, each file once. Empty documents are skipped.

Output, in the directory ``out_dir``: every document's tokens followed by the end-of-text token
(GPT-2's ``<|endoftext|>``; for the char tokenizer the character U+0003 END OF TEXT, added to the
vocabulary, so a document that contains that character reads as two), appended to its split's
shards ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``, ...: little-endian
uint16, ``shard_tokens`` tokens each except the last of a split (a document may continue in the
next shard). ``meta.json``, written last, records the format and its version, the tokenizer, the
end-of-text id, the dtype, documents and tokens per split, every shard with its token count,
and the sources with their sizes.

Split: a document goes to val when a hash of (its file's position in the list of files, the line
it starts on, or its Parquet row, both counted from 1) falls below ``val_fraction``. That depends on the inputs only, never on the number of
workers, and no document is split between train and val.

Memory is bounded by the pieces in flight, not by the corpus or a shard: the main process reads
each file in blocks, hands pieces of about ``chunk_bytes`` to the workers (at most two per worker
at a time), and appends their tokens to the open shards as they come back, in input order. A long
``.txt`` or ``.md`` document is cut into pieces only where the tokenisation cannot change.

Cut rule: between two characters ``x`` and ``y`` of a document when ``x`` is not whitespace and
either (a) ``y`` is whitespace (Unicode's White_Space: space, tab, line breaks, no-break space,
...), or (b) neither is whitespace nor an apostrophe and they fall in different classes of the
pre-tokenizer: letters (``\\p{L}``), numbers (``\\p{N}``) and the rest, by Unicode 3.2 as by this
Python's Unicode (so a newer or older Unicode in the regex cannot class them otherwise). Neither
may be unassigned in this Python's Unicode database or an undecodable byte. Why this cannot change the tokens: GPT-2's pre-tokenizer (the
regex in :mod:`.tokenizers`) splits text into pieces that are then encoded independently, a piece
starting where the last one ended. Its alternatives are the contractions (an apostrophe and fixed
letters), ``" ?\\p{L}+"``, ``" ?\\p{N}+"``, ``" ?[^\\s\\p{L}\\p{N}]+"`` and two runs of whitespace.
None matches ``x`` followed by ``y``: a leading space is optional only at a piece's start, a run
keeps to one class, whitespace runs hold no other character, and a contraction crosses a class
change only just after its apostrophe (hence no cut next to one). So the whole text's encoding has
a piece boundary between ``x`` and ``y``. Encoding the part up to ``x`` alone gives the same pieces:
every attempt that looks past ``x`` sees ``y`` or the end of the text, and both end a run, leave
``\\s+(?!\\S)``'s lookahead true and fail a contraction. The part from ``y`` on gives the same
pieces because the regex has no lookbehind. (A cut between two newlines is *not* safe:
``\\s+(?!\\S)`` takes all but the last character of a whitespace run as one piece, and a cut
changes where the run ends; nor is one after an apostrophe: ``'s`` is one piece.) ``str.isspace``
holds for every character that the regex's ``\\s`` matches, so "``x`` is not whitespace" errs on the
safe side, and so do the refused unassigned characters. tests/test_prepare.py checks the rule
against whole-text encoding on varied text.

What this bounds: a stretch of a document with no such place is held whole: more than
``chunk_bytes`` without whitespace after a non-space character and without a change between
letters, numbers and other symbols (one word, number, run of symbols or of whitespace of
megabytes, which the BPE could not encode in reasonable time anyway, or symbols and letters joined
only by apostrophes). A JSONL line, and a Parquet row group's text column, are read whole.

Workers: pieces are formed in the main process from the input alone and their tokens written in
input order, so the shards are byte-identical whatever the number of workers. ``workers=1``
tokenizes in the main process. The char tokenizer needs a first pass over the corpus for its
vocabulary.

Interruption: each shard is written under a temporary name and renamed when complete
(:func:`fastgpt_kernels._io.atomic_writer`), ``meta.json`` last, so no file that looks complete is
ever partial, and a directory without ``meta.json`` is never read as a corpus. A run starts clean:
it first removes ``meta.json``, then the shards and temporary files an earlier run left in
``out_dir`` (other files are left alone). Resuming was not chosen: a shard boundary falls inside
a piece and the two splits' shards close at different points of the input, so a resume point
would have to record both open shards' contents as well.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import glob
import gzip
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
import unicodedata
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fastgpt_kernels import _processes
from fastgpt_kernels._io import atomic_writer, stale_temp_files

from ._common import (CORPUS_FORMAT, CORPUS_VERSION, META_FILE, SHARD_GLOB, SPLITS, TOKEN_DTYPE, _check_int,
                      _check_val_fraction, check_uint16_vocab, shard_name)
from .tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, _check_tokenizer_kind, tokenizer_from_dict

__all__ = ["prepare_corpus", "find_sources", "Source", "CHAR_EOT"]

CHAR_EOT = "\x03"
"""The char tokenizer's end-of-text: the control character U+0003, END OF TEXT."""
_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
_SUPPORTED = ".txt, .md or .jsonl (each optionally .gz) or .parquet"
_BOM = "\ufeff"


@dataclass(frozen=True)
class Source:
    """One input file: ``format`` is ``"text"`` (one document), ``"jsonl"`` (one per line) or
    ``"parquet"`` (one per row)."""

    path: Path
    format: str
    gzip: bool
    size: int  # bytes on disk


def _format_of(path: Path) -> tuple[str, bool] | None:
    """``(format, gzipped)`` from the file name, or None for a file type that is not read."""
    name = path.name.lower()
    gzipped = name.endswith(".gz")
    fmt = _FORMATS.get(Path(name.removesuffix(".gz")).suffix)
    if fmt is None or (fmt == "parquet" and gzipped):  # Parquet compresses inside the file
        return None
    return fmt, gzipped


def find_sources(sources) -> list[Source]:
    """The input files that ``sources`` (paths of files or directories, or glob patterns) name.

    A file named explicitly must be a supported type (``.txt``, ``.md``, ``.jsonl``, each optionally
    ``.gz``); directories (recursively) and globs contribute their supported files, sorted by path.
    A file named twice is read once.

    Raises:
        ValueError: no sources, a source that matches no supported file, or an unsupported file.
        FileNotFoundError: a source that is neither a file, a directory nor a glob pattern.
        OSError: a file that cannot be opened for reading.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError(f"no input: give at least one file, directory or glob pattern of {_SUPPORTED} files")
    found, seen = [], set()
    for source in sources:
        for path in _expand(source):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(_source(path))
    return found


def _expand(source) -> list[Path]:
    """The supported files that one source names."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a source must be a str or os.PathLike, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        if _format_of(path) is None:
            raise ValueError(f"{path}: unsupported file type; expected {_SUPPORTED}")
        return [path]
    if path.is_dir():
        roots = [path]
    elif glob.has_magic(str(source)):
        roots = [Path(p) for p in sorted(glob.glob(str(source), recursive=True))]
    else:
        raise FileNotFoundError(f"source {str(source)!r} does not exist (and is not a glob pattern)")
    files = []
    for root in roots:
        candidates = sorted(root.rglob("*")) if root.is_dir() else [root]
        files += [p for p in candidates if p.is_file() and _format_of(p) is not None]
    if not files:
        raise ValueError(f"no input: source {str(source)!r} matches no {_SUPPORTED} file")
    return files


def _source(path: Path) -> Source:
    """The :class:`Source` of ``path``, checked to open for reading."""
    try:
        with open(path, "rb"):
            pass
        size = path.stat().st_size
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None
    fmt, gzipped = _format_of(path)
    if fmt == "parquet":
        _parquet()  # missing pyarrow is said before any work
    return Source(path=path, format=fmt, gzip=gzipped, size=size)


# ------------------------------------------------------------------------------------------------
# reading: the main process cuts the input into pieces
# ------------------------------------------------------------------------------------------------

@dataclass
class _Piece:
    """Consecutive bytes of one file (part of a text document, or whole JSONL lines), or the texts
    of consecutive Parquet rows."""

    source: int   # the file's position in the list of sources
    line: int     # line number (from 1) of the first byte; for Parquet, the first row's number (from 1)
    data: bytes | list[str]
    first: bool   # the piece starts its file (a byte-order mark may lead it); text and JSONL only
    last: bool    # the piece ends its file (for a text file: its document); text and JSONL only

    @property
    def size(self) -> int:
        """Bytes, or for Parquet rows their characters."""
        return len(self.data) if isinstance(self.data, bytes) else sum(map(len, self.data))


_CUT_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                       "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
"""The whitespace a cut may come before: Unicode's White_Space property, unchanged since Unicode 6.3,
which is what the regex's ``\\s`` matches."""
_NO_CUT = frozenset(("Cn", "Cs"))
"""Categories no cut touches: unassigned here (the regex's Unicode may know them) and undecodable bytes."""
_CUT_WINDOW = 1 << 16  # bytes examined at a time, from the end back


def _safe_cut(before: str, after: str) -> bool:
    """Whether a text document may be cut between the characters ``before`` and ``after``: the
    module's cut rule (see its docstring for why each case cannot change the tokens)."""
    if before.isspace() or unicodedata.category(before) in _NO_CUT:
        return False
    if after in _CUT_SPACE:
        return True
    if after.isspace() or unicodedata.category(after) in _NO_CUT or "'" in (before, after):
        return False
    classes = _cut_class(before), _cut_class(after)
    return None not in classes and classes[0] != classes[1]


def _cut_class(char: str) -> str | None:
    """The pre-tokenizer's class of a character that is not whitespace: letter, number or other; None
    unless Unicode 3.2 already gave it that class (a class settled long before any regex's tables)."""
    kind = unicodedata.category(char)[0]
    kind = kind if kind in "LN" else "O"
    old = unicodedata.ucd_3_2_0.category(char)
    return kind if old != "Cn" and (old[0] if old[0] in "LN" else "O") == kind else None


def _last_cut(data: bytearray, floor: int = 0) -> int:
    """The last place in ``data`` after byte ``floor`` where a text document may be cut (the module's
    cut rule), or 0 if there is none. Bytes are examined from the end back, a window at a time, so a
    search usually reads a few characters; with no cut at all it reads ``data[floor:]`` once."""
    end = len(data)
    while end > floor:
        start = max(floor, end - _CUT_WINDOW)
        while start > floor and 0x80 <= data[start] < 0xC0:  # start on a character's first byte
            start -= 1
        text = bytes(data[start:end]).decode("utf-8", "surrogateescape")  # bad bytes: one surrogate each
        for i in range(len(text) - 1, 0, -1):
            if _safe_cut(text[i - 1], text[i]):
                return start + len(text[:i].encode("utf-8", "surrogateescape"))
        if start == floor:
            break
        end = start + len(text[0].encode("utf-8", "surrogateescape"))  # its first character comes "after" once more
    return 0


def _pieces(sources: list[Source], chunk_bytes: int, text_field: str, progress: _Progress) -> Iterator[_Piece]:
    """Every file's bytes as pieces of about ``chunk_bytes``, cut where the format allows."""
    for index, source in enumerate(sources):
        if source.format == "parquet":
            yield from _parquet_pieces(index, source, chunk_bytes, text_field, progress)
            continue
        try:
            with open(source.path, "rb") as raw:
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if source.gzip else raw
                yield from _file_pieces(index, source, stream, raw, chunk_bytes, progress)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise ValueError(f"{source.path} is not a valid gzip file: {exc}") from None
        except OSError as exc:
            raise OSError(f"cannot read {source.path}: {exc.strerror or exc}") from None


def _file_pieces(index: int, source: Source, stream, raw, chunk_bytes: int, progress: _Progress):
    """One file's pieces, read from ``stream`` (``raw`` itself, or a gzip reader on it)."""
    buffer = bytearray()
    line, first, counted = 1, True, 0
    searched = 0  # the last search found no cut after buffer[:searched] (8 bytes back: a character across its end)
    while block := stream.read(chunk_bytes):
        buffer += block
        progress.read += raw.tell() - counted  # bytes on disk, compressed or not
        counted = raw.tell()
        if len(buffer) < chunk_bytes:
            continue
        cut = buffer.rfind(b"\n") + 1 if source.format == "jsonl" else _last_cut(buffer, searched)
        if cut > 0:
            data = bytes(buffer[:cut])
            del buffer[:cut]
            yield _Piece(index, line, data, first, last=False)
            line += data.count(b"\n")
            first = False
        searched = max(0, len(buffer) - 8)
    yield _Piece(index, line, bytes(buffer), first, last=True)


def _parquet():
    """``pyarrow.parquet``, or ImportError saying how to install it."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install 'fastgpt[parquet]'") from None
    return pyarrow.parquet


def _parquet_pieces(index: int, source: Source, chunk_bytes: int, text_field: str, progress: _Progress):
    """One Parquet file's rows, the ``text_field`` column's strings, as pieces of about ``chunk_bytes``
    characters. The file is read a row group at a time, that column only."""
    parquet = _parquet()
    import pyarrow as pa
    path = source.path
    try:
        reader = parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path} is not a valid Parquet file: {exc}") from None
    with reader:
        schema = reader.schema_arrow
        if text_field not in schema.names:
            columns = ", ".join(map(repr, schema.names[:10])) or "none"
            raise ValueError(f"{path}: no column {text_field!r} (its columns: {columns}); choose the column with "
                             "--text_field")
        kind = schema.field(text_field).type
        if str(kind) not in ("string", "large_string", "string_view"):
            raise ValueError(f"{path}: the {text_field!r} column holds {kind}, not strings")
        rows, row = max(reader.metadata.num_rows, 1), 1
        for group in range(reader.num_row_groups):
            try:
                column = reader.read_row_group(group, columns=[text_field]).column(0)
                texts = column.to_pylist()
            except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: row group {group} (rows from {row}) cannot be read: {exc}") from None
            if column.null_count:
                raise ValueError(f"{path}, row {row + texts.index(None)}: the {text_field!r} column is null")
            batch, size = [], 0
            for text in texts:
                batch.append(text)
                size += len(text)
                if size >= chunk_bytes:
                    yield _Piece(index, row, batch, first=False, last=False)
                    row, batch, size = row + len(batch), [], 0
            if batch:
                yield _Piece(index, row, batch, first=False, last=False)
                row += len(batch)
            progress.read += source.size * len(texts) / rows


def _tasks(pieces: Iterator[_Piece], chunk_bytes: int) -> Iterator[list[_Piece]]:
    """Pieces grouped into tasks of about ``chunk_bytes``: many small files make one task, and a
    piece of a large file (a little under ``chunk_bytes``, cut where its format allows) makes one alone."""
    task, size = [], 0
    for piece in pieces:
        task.append(piece)
        size += piece.size
        if size >= chunk_bytes // 2:
            yield task
            task, size = [], 0
    if task:
        yield task


# ------------------------------------------------------------------------------------------------
# tokenizing: the workers
# ------------------------------------------------------------------------------------------------

@dataclass
class _Encoder:
    """What a worker does with a task: decode and parse its documents, then collect their characters
    (the char tokenizer's first pass) or encode them into each split's tokens."""

    paths: list[str]
    formats: list[str]
    text_field: str
    val_fraction: float
    tokenizer_dict: dict | None = None  # None in the char tokenizer's vocabulary pass
    eot_token: int | None = None

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """Built where it is used: in each worker, from ``tokenizer_dict``."""
        return tokenizer_from_dict(self.tokenizer_dict)

    def characters(self, task: list[_Piece]) -> set[str]:
        """The characters of the task's documents."""
        chars = set()
        for piece in task:
            for _, text, _ in self._documents(piece):
                chars.update(text)
        return chars

    def encode(self, task: list[_Piece]) -> dict:
        """Per split, the tokens (uint16) and the number of documents that end in this task."""
        tokens = {split: [] for split in SPLITS}
        documents = dict.fromkeys(SPLITS, 0)
        eot = np.array([self.eot_token], dtype=TOKEN_DTYPE)
        for piece in task:
            for doc_line, text, ends in self._documents(piece):
                split = "val" if self._is_val(piece.source, doc_line) else "train"
                tokens[split].append(self.tokenizer.encode_array(text).astype(TOKEN_DTYPE))
                if ends:
                    tokens[split].append(eot)
                    documents[split] += 1
        return {"tokens": {split: np.concatenate(tokens[split]) if tokens[split] else np.empty(0, TOKEN_DTYPE)
                           for split in SPLITS},
                "documents": documents}

    def _is_val(self, source: int, line: int) -> bool:
        """The split rule: a hash of (file position, first line) below ``val_fraction``."""
        digest = hashlib.blake2b(f"{source}:{line}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self.val_fraction * 2.0 ** 64

    def _documents(self, piece: _Piece) -> Iterator[tuple[int, str, bool]]:
        """``(line the document starts on, its text in this piece, whether the piece ends it)``."""
        path = self.paths[piece.source]
        if self.formats[piece.source] == "parquet":
            yield from ((piece.line + offset, text, True) for offset, text in enumerate(piece.data) if text)
            return
        text = _decode(piece, path)
        if piece.first:
            text = text.removeprefix(_BOM)
        if self.formats[piece.source] == "text":
            if text or not (piece.first and piece.last):  # an empty file is no document
                yield 1, text, piece.last
            return
        for offset, line in enumerate(text.split("\n")):
            if line.strip():
                document = _json_text(line, self.text_field, path, piece.line + offset)
                if document:
                    yield piece.line + offset, document, True


def _decode(piece: _Piece, path: str) -> str:
    """The piece's bytes as UTF-8; invalid bytes raise ValueError naming the file and line."""
    try:
        return piece.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = piece.data.rfind(b"\n", 0, exc.start) + 1
        line = piece.line + piece.data.count(b"\n", 0, exc.start)
        raise ValueError(f"{path}:{line}: invalid UTF-8 (byte {piece.data[exc.start]:#04x} at column "
                         f"{exc.start - line_start + 1})") from None


def _json_text(line: str, field: str, path: str, line_number: int) -> str:
    """The ``field`` string of one JSONL line; anything else raises ValueError naming the file and line."""
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with a {field!r} field, got a JSON "
                         f"{type(record).__name__}")
    if field not in record:
        keys = ", ".join(map(repr, list(record)[:10])) or "none"
        raise ValueError(f"{where}: the JSON object has no {field!r} field (its fields: {keys}); "
                         "choose the field with --text_field")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: the {field!r} field is a JSON {type(text).__name__}, not a string")
    return text


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(encoder: _Encoder, parent: int) -> None:
    global _WORKER_ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which stops the pool
    _processes.watch(parent)  # a main process killed outright leaves no worker behind
    _WORKER_ENCODER = encoder


def _in_worker(method: str, task: list[_Piece]):
    return getattr(_WORKER_ENCODER, method)(task)


@contextlib.contextmanager
def _worker_pool(workers: int, encoder: _Encoder):
    """A process pool for ``workers`` > 1 (None for one: the main process does the work); on the
    way out, tasks not yet started are cancelled."""
    if workers == 1:
        yield None
        return
    # Forked whatever the default start method (forkserver from Python 3.14 on Linux): a worker
    # watches for its parent, this process, and shares the pages it has already loaded.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker,
                               initargs=(encoder, os.getpid()))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _results(files: list[Source], workers: int, encoder: _Encoder, method: str, chunk_bytes: int,
             bar: _Progress):
    """The results of ``encoder.<method>`` on every task of the input, in input order; on the way
    out the input is closed and the pool stopped."""
    with _worker_pool(workers, encoder) as pool:
        tasks = _tasks(_pieces(files, chunk_bytes, encoder.text_field, bar), chunk_bytes)
        stream = _in_order(pool, encoder, method, tasks, window=2 * workers)
        try:
            yield stream
        finally:
            stream.close()


def _in_order(pool, encoder: _Encoder, method: str, tasks: Iterator[list[_Piece]], window: int):
    """``encoder.<method>(task)`` for every task, in input order, with at most ``window`` tasks in
    flight, so reading never runs far ahead of the workers."""
    if pool is None:
        yield from map(getattr(encoder, method), tasks)
        return
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.submit(_in_worker, method, task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------------
# writing: shards and meta.json
# ------------------------------------------------------------------------------------------------


class _ShardWriter:
    """One split's token stream, cut into shards of exactly ``shard_tokens`` tokens (the last one
    shorter). A context manager: leaving it normally completes the last shard; leaving it by an
    exception discards the shard being written."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of every complete shard
        self._writer = None  # the atomic_writer of the shard being written
        self._file = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                self._writer = atomic_writer(self.directory / shard_name(self.split, len(self.shards)))
                self._file, self._count = self._writer.__enter__(), 0
            part, tokens = tokens[:self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            self._file.write(memoryview(part))
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._finish(None, None, None)

    def _finish(self, *exc_info) -> None:
        # Renames the shard into place, or removes it on an exception. The writer is forgotten only
        # afterwards: if an interruption stops this call, __exit__ passes it on to the writer again,
        # which is harmless once the writer has finished.
        self._writer.__exit__(*exc_info)
        self._writer = self._file = None
        if exc_info[0] is None:
            self.shards.append({"file": shard_name(self.split, len(self.shards)), "tokens": self._count})

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc_info) -> bool:
        if self._writer is not None:
            self._finish(*exc_info)
        return False


def _start_clean(directory: Path) -> None:
    """Remove ``meta.json`` first (a directory without it is never read as a corpus), then the
    shards and temporary files that an earlier run left."""
    (directory / META_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        pattern = SHARD_GLOB.format(split=split)
        for path in [*directory.glob(pattern), *stale_temp_files(directory, pattern)]:
            path.unlink()
    for path in stale_temp_files(directory, META_FILE):
        path.unlink()


class _Progress:
    """A status line on stderr: bytes read of the total, MB/s, and tokens written once there are
    any. Redrawn in place on a terminal (at most five times a second); elsewhere printed every
    10 s, so logs stay short."""

    def __init__(self, total_bytes: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total_bytes, label, enabled
        self.read, self.tokens = 0, 0
        self.start = time.perf_counter()
        self._shown = self.start
        self._live = enabled and sys.stderr.isatty()

    def show(self, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._shown < (0.2 if self._live else 10.0)):
            return
        self._shown = now
        mb = self.read / 1e6
        line = (f"{self.label}: {mb:,.1f}/{self.total / 1e6:,.1f} MB ({100 * self.read / max(self.total, 1):.0f}%) "
                f"{mb / max(now - self.start, 1e-9):.1f} MB/s" + (f", {self.tokens:,} tokens" if self.tokens else ""))
        if self._live:
            print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the whole job
# ------------------------------------------------------------------------------------------------

def prepare_corpus(sources, out_dir, tokenizer: str = "gpt2", workers: int = 1, text_field: str = "text",
                   val_fraction: float = 0.0005, shard_tokens: int = 100_000_000, chunk_bytes: int = 4 << 20,
                   progress: bool = True) -> dict:
    """Tokenize ``sources`` into a sharded corpus in ``out_dir`` (see the module docstring); returns
    the content of its ``meta.json``.

    Args:
        sources: paths of files or directories, or glob patterns (:func:`find_sources`).
        out_dir: the output directory, created if needed; an earlier corpus there is replaced.
        tokenizer: ``"gpt2"`` (default) or ``"char"`` (a vocabulary of the corpus's characters,
            found in a first pass).
        workers: processes that tokenize (default 1: the main process itself).
        text_field: the field of a JSONL object, or the Parquet column, that holds the text (default ``"text"``).
        val_fraction: the expected fraction of documents in the val split, in [0, 1) (default 0.0005).
        shard_tokens: tokens per shard (default 100M: 200 MB files).
        chunk_bytes: bytes of text per task handed to a worker, and the size of the pieces a long
            document is cut into (default 4 MiB); bounds the memory in use.
        progress: show a progress line on stderr (default True).

    Raises:
        ValueError: no input; an unsupported file; a file that is not valid gzip; invalid UTF-8 or
            a JSONL line that is not valid JSON or lacks ``text_field`` (the message names the file
            and line); a vocabulary with ids beyond uint16.
        OSError: a file that cannot be read.
    """
    kind = _check_tokenizer_kind(tokenizer)
    workers = _check_int("workers", workers)
    shard_tokens = _check_int("shard_tokens", shard_tokens)
    chunk_bytes = _check_int("chunk_bytes", chunk_bytes)
    val_fraction = _check_val_fraction(val_fraction)
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a str or os.PathLike, got {type(out_dir).__name__}")
    files = find_sources(sources)
    total_bytes = sum(f.size for f in files)
    encoder = _Encoder(paths=[str(f.path) for f in files], formats=[f.format for f in files],
                       text_field=text_field, val_fraction=val_fraction)

    if kind == "char":
        chars = {CHAR_EOT}
        bar = _Progress(total_bytes, "pass 1 of 2 (characters)", progress)
        with _results(files, workers, encoder, "characters", chunk_bytes, bar) as results:
            for found in results:
                chars |= found
                bar.show()
        bar.show(final=True)
        tok: Tokenizer = CharTokenizer("".join(chars))
        eot, label = tok.encode(CHAR_EOT)[0], "pass 2 of 2 (tokens)"
    else:
        tok = GPT2Tokenizer()
        eot, label = tok.eot_token, "tokens"
    check_uint16_vocab(tok, f"the {len(files)} source file(s)")
    encoder = replace(encoder, tokenizer_dict=tok.to_dict(), eot_token=eot)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _start_clean(out)
    documents = dict.fromkeys(SPLITS, 0)
    bar = _Progress(total_bytes, label, progress)
    with contextlib.ExitStack() as stack:
        writers = {split: stack.enter_context(_ShardWriter(out, split, shard_tokens)) for split in SPLITS}
        results = stack.enter_context(_results(files, workers, encoder, "encode", chunk_bytes, bar))
        for result in results:
            for split in SPLITS:
                writers[split].write(result["tokens"][split])
                documents[split] += result["documents"][split]
                bar.tokens += len(result["tokens"][split])
            bar.show()
    bar.show(final=True)
    meta = {
        "format": CORPUS_FORMAT, "version": CORPUS_VERSION, "tokenizer": tok.to_dict(), "eot_token": eot,
        "dtype": TOKEN_DTYPE.str, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
        "text_field": text_field,
        "splits": {split: {"documents": documents[split], "tokens": sum(s["tokens"] for s in writers[split].shards),
                           "shards": writers[split].shards} for split in SPLITS},
        "sources": [{"path": str(f.path.resolve()), "bytes": f.size, "format": f.format, "gzip": f.gzip}
                    for f in files],
    }
    with atomic_writer(out / META_FILE) as f:
        f.write(json.dumps(meta, indent=1).encode("utf-8"))
    return meta
