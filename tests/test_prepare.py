"""python -m fastgpt.prepare: sources of every kind streamed into shards that are the same whatever
the number of workers, long documents cut where tokenisation cannot change, interruptions that leave
nothing complete-looking, clear errors for bad input, and training from the result."""
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_processes_end, run_python
from fastgpt import checkpoint
from fastgpt import prepare as prepare_command
from fastgpt import train as training
from fastgpt.data import GPT2Tokenizer, load_dataset, open_corpus
from fastgpt.data import streaming
from fastgpt.data.streaming import CHAR_EOT, find_sources, prepare_corpus

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog it's we'll 2024 3.14 naïve café 日本語 🙂 — "
         "def main(): return x**2 # comment").split()
SPACES = ["", " ", "  ", "\t", "\u00a0", "\u3000"]


def random_text(rng: random.Random, lines: int, newline: str = "\n") -> str:
    """Lines of words and punctuation, some ending in whitespace, runs of blank lines between."""
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
        out.append(words + rng.choice(SPACES) + rng.choice([".", "", "!", ","]) * rng.randint(0, 1))
        out.extend([rng.choice(SPACES)] * rng.choice([0, 0, 0, 1, 2, 3]))
    return newline.join(out) + newline


def write(path: Path, text: str, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=bool(i % 2)) + "\n" for i, r in enumerate(records))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 3 MB of text in 10 files: txt, md, jsonl, gz, a nested directory, a glob; and the documents
    each file holds, in order."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    docs: dict[str, list[str]] = {}

    def add_text(rel: str, text: str, gz: bool = False, bom: bool = False):
        write(root / rel, ("\ufeff" if bom else "") + text, gz)
        docs[rel] = [text] if text else []

    def add_jsonl(rel: str, texts: list[str], gz: bool = False):
        records = [{"id": i, "text": t, "meta": {"n": i}} for i, t in enumerate(texts)]
        body = jsonl(records)
        body = body.replace("\n", "\n\n", 3)  # blank lines are skipped
        write(root / rel, body, gz)
        docs[rel] = [t for t in texts if t]

    add_text("books/a.txt", random_text(rng, 15000), bom=True)
    add_text("books/b.md", random_text(rng, 6000, newline="\r\n"))
    add_text("books/empty.txt", "")
    add_text("books/deep/c.txt.gz", random_text(rng, 12000), gz=True)
    add_text("books/deep/d.md.gz", random_text(rng, 800), gz=True)
    add_jsonl("books/deep/e.jsonl", [random_text(rng, rng.randint(1, 30)) for _ in range(1500)] + [""])
    add_jsonl("web/f.jsonl.gz", [random_text(rng, rng.randint(1, 30)) for _ in range(1000)], gz=True)
    add_jsonl("web/g.jsonl.gz", [random_text(rng, rng.randint(1, 30)) for _ in range(300)], gz=True)
    write(root / "web/notes.csv", "a,b\n1,2\n")  # not a supported type: a glob or directory skips it
    add_text("single.md", random_text(rng, 400))
    sources = [str(root / "books"), str(root / "web" / "*.jsonl.gz"), str(root / "single.md")]
    return root, sources, docs


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """The corpus prepared with 1 and with 2 workers, small shards, small pieces."""
    _, sources, _ = corpus
    out = tmp_path_factory.mktemp("prepared")
    options = dict(val_fraction=0.1, shard_tokens=100_000, chunk_bytes=64 << 10, progress=False)
    metas = {n: prepare_corpus(sources, out / f"w{n}", workers=n, **options) for n in (1, 2)}
    return out, metas


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_sources_are_taken_in_order_each_file_once(corpus):
    root, sources, _ = corpus
    found = find_sources([*sources, str(root / "books" / "a.txt")])  # a.txt again: read once
    assert [f.path.relative_to(root).as_posix() for f in found] == [
        "books/a.txt", "books/b.md", "books/deep/c.txt.gz", "books/deep/d.md.gz", "books/deep/e.jsonl",
        "books/empty.txt", "web/f.jsonl.gz", "web/g.jsonl.gz", "single.md"]
    assert [(f.format, f.gzip) for f in found][2:5] == [("text", True), ("text", True), ("jsonl", False)]


def test_one_and_two_workers_write_byte_identical_shards(prepared):
    out, metas = prepared
    one, two = shard_bytes(out / "w1"), shard_bytes(out / "w2")
    assert one == two
    assert sum(name.startswith("train_") for name in one) >= 10 and "val_000000.bin" in one


def test_metadata_counts_match_the_shards_and_the_documents(corpus, prepared):
    root, sources, docs = corpus
    out, metas = prepared
    meta = json.loads((out / "w1" / "meta.json").read_text())
    assert meta == metas[1]
    assert (meta["format"], meta["version"], meta["dtype"]) == ("fastgpt-corpus", 1, "<u2")
    assert meta["tokenizer"] == {"kind": "gpt2"} and meta["eot_token"] == 50256
    for split, entry in meta["splits"].items():
        sizes = [(out / "w1" / s["file"]).stat().st_size for s in entry["shards"]]
        assert sizes == [2 * s["tokens"] for s in entry["shards"]]
        assert all(s["tokens"] == 100_000 for s in entry["shards"][:-1])
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
    assert [s["bytes"] for s in meta["sources"]] == [f.size for f in find_sources(sources)]
    # Every document comes back, in input order within its split, followed by the end-of-text token.
    tok = GPT2Tokenizer()
    corpus_ = open_corpus(out / "w1")
    expected = [d for f in find_sources(sources) for d in docs[f.path.relative_to(root).as_posix()]]
    got = {}
    for split in ("train", "val"):
        tokens = np.concatenate(corpus_.shards(split)).tolist()
        assert tokens[-1] == tok.eot_token
        pieces = " ".join(map(str, tokens[:-1])).split(f" {tok.eot_token} ")
        got[split] = [tok.decode(list(map(int, p.split()))) for p in pieces]
        assert len(got[split]) == meta["splits"][split]["documents"]
    assert 0.04 < len(got["val"]) / len(expected) < 0.2  # val_fraction 0.1, decided per document
    heads = {"train": 0, "val": 0}
    for doc in expected:  # each split is a subsequence of the input, and together they are all of it
        split = "train" if heads["train"] < len(got["train"]) and got["train"][heads["train"]] == doc else "val"
        assert got[split][heads[split]] == doc
        heads[split] += 1
    assert heads == {"train": len(got["train"]), "val": len(got["val"])}


def test_cut_rule_keeps_the_tokens_of_the_whole_text():
    tok = GPT2Tokenizer()
    rng = random.Random(1)
    alphabet = list("ab Z9 \n\n\t\r.,'!") + ["'s", "'ll", "\u00a0", "\u3000", "\u2028", "\x85", "\r\n", " 's",
                                             "日本", "🙂", "é", "<|endoftext|>", "'re", "'d", "'m", "'ve", "'t",
                                             "\x0b", "\x0c", "\x1c", "\u200b", "\u0301", "_", "$", "٣", "Ⅻ", "½",
                                             "ǅ", "ʰ", "’", "\u0378", "。", "12", "  "]
    checked = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40)))
        data = bytearray(text.encode("utf-8"))
        whole = tok.encode(text)
        end = len(data)
        while cut := streaming._last_cut(data[:end]):  # every place the rule allows, last to first
            head, tail = bytes(data[:cut]).decode(), bytes(data[cut:]).decode()
            assert tok.encode(head) + tok.encode(tail) == whole, (head, tail)
            checked += 1
            end = cut
    assert checked > 10000
    # The obvious rule, cutting between two newlines, is wrong: a run of whitespace ends elsewhere.
    text = "end.\n\n\nNext"
    assert tok.encode(text[:5]) + tok.encode(text[5:]) != tok.encode(text)
    assert streaming._last_cut(bytearray(text.encode())) == 4


def test_cut_rule_cases():
    allowed = [("a", " "), ("a", "\n"), (".", "\t"), ("'", " "), ("a", "1"), ("1", "a"), ("a", "."), (".", "a"),
               ("日", "。"), ("a", "\u200b"), ("é", "½"), ("a", "\u00a0"), ("x", "\u3000"), ("🙂", " ")]
    refused = [(" ", "a"), ("\n", "\n"), ("a", "b"), ("1", "2"), (".", ","), ("'", "s"), ("a", "'"), ("a", "\x1c"),
               ("a", "\u0378"), ("\u0378", " "), ("a", "\udc80"), ("🙂", "a"), ("\u00a0", "a")]
    assert [pair for pair in allowed if not streaming._safe_cut(*pair)] == []
    assert [pair for pair in refused if streaming._safe_cut(*pair)] == []


def test_a_document_without_a_cut_at_its_line_breaks_streams_in_bounded_pieces(tmp_path, monkeypatch):
    # Every line break follows a space, so the breaks are no cut; the words still are.
    text = "".join(f"line {i} of words, each word then a space \n" for i in range(3000))
    write(tmp_path / "spaced.txt", text)
    pieces = []
    real = streaming._Encoder.encode
    monkeypatch.setattr(streaming._Encoder, "encode", lambda self, task: pieces.extend(task) or real(self, task))
    prepare_corpus([tmp_path / "spaced.txt"], tmp_path / "out", val_fraction=0.0, chunk_bytes=4096, progress=False)
    tokens = np.concatenate(open_corpus(tmp_path / "out").shards("train")).tolist()
    tok = GPT2Tokenizer()
    assert tokens == tok.encode(text) + [tok.eot_token]
    assert len(pieces) > 25 and max(len(p.data) for p in pieces) <= 2 * 4096


def test_the_last_cut_is_found_across_windows_and_characters_of_several_bytes(monkeypatch):
    monkeypatch.setattr(streaming, "_CUT_WINDOW", 5)  # windows of a few bytes: characters and cuts straddle them
    rng = random.Random(4)
    alphabet = ["a", "é", "日本", "🙂", " ", "\u3000", "1", "½", ".", "'", "\n", "xy"]
    for _ in range(400):
        data = bytearray("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).encode())
        floor = rng.choice([0, rng.randrange(len(data) + 1)])
        text = bytes(data[floor:]).decode("utf-8", "surrogateescape")
        cuts = [i for i in range(1, len(text)) if streaming._safe_cut(text[i - 1], text[i])]
        expected = floor + len(text[:cuts[-1]].encode("utf-8", "surrogateescape")) if cuts else 0
        assert streaming._last_cut(data, floor) == expected, (bytes(data), floor)


def test_a_run_with_no_cut_is_held_whole_and_searched_once(monkeypatch):
    run = bytearray(b"a" * 300_000)
    assert streaming._last_cut(run) == 0
    calls = []
    real = streaming._safe_cut
    monkeypatch.setattr(streaming, "_safe_cut", lambda x, y: calls.append(1) or real(x, y))
    assert streaming._last_cut(run, floor=len(run) - 100) == 0 and len(calls) < 100
    assert streaming._last_cut(bytearray(b"b" + run)) == 0
    assert streaming._last_cut(bytearray(b"1" + run)) == 1


def test_a_run_with_no_cut_is_read_in_linear_time(tmp_path, monkeypatch):
    text = "x" * 40_000 + " and the rest"
    write(tmp_path / "run.txt", text)
    calls = []
    real = streaming._safe_cut
    monkeypatch.setattr(streaming, "_safe_cut", lambda x, y: calls.append(1) or real(x, y))
    prepare_corpus([tmp_path / "run.txt"], tmp_path / "out", val_fraction=0.0, chunk_bytes=4096, progress=False)
    assert len(calls) < 1.2 * len(text)  # each byte examined about once, not once per block read
    tok = GPT2Tokenizer()
    assert np.concatenate(open_corpus(tmp_path / "out").shards("train")).tolist() == tok.encode(text) + [tok.eot_token]


def test_a_long_document_streams_in_pieces_with_the_tokens_of_the_whole(tmp_path):
    text = random_text(random.Random(2), 20000) + "no newline at the end"
    write(tmp_path / "long.txt", text)
    meta = prepare_corpus([tmp_path / "long.txt"], tmp_path / "out", val_fraction=0.0, chunk_bytes=4096,
                          shard_tokens=50_000, progress=False)
    tokens = np.concatenate(open_corpus(tmp_path / "out").shards("train")).tolist()
    tok = GPT2Tokenizer()
    assert tokens == tok.encode(text) + [tok.eot_token]  # cut into about 200 pieces on the way
    assert len(text) // 4096 > 150 and meta["splits"]["train"]["documents"] == 1


def test_char_tokenizer_takes_the_corpus_characters_and_separates_documents(tmp_path):
    write(tmp_path / "a.txt", "abc\nab")
    write(tmp_path / "b.jsonl", jsonl([{"text": "ba"}, {"text": "éé"}]))
    meta = prepare_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", tokenizer="char",
                          workers=2, val_fraction=0.0, progress=False)
    corpus = open_corpus(tmp_path / "out")
    assert corpus.tokenizer.chars == "".join(sorted(set("abc\né" + CHAR_EOT)))
    assert corpus.tokenizer.decode(corpus.shards("train")[0]) == f"abc\nab{CHAR_EOT}ba{CHAR_EOT}éé{CHAR_EOT}"
    assert meta["eot_token"] == corpus.tokenizer.encode(CHAR_EOT)[0]


def test_interrupted_run_leaves_no_complete_looking_shard_and_a_rerun_starts_clean(corpus, prepared, tmp_path,
                                                                                   monkeypatch):
    _, sources, _ = corpus
    out = tmp_path / "out"
    options = dict(val_fraction=0.1, shard_tokens=100_000, chunk_bytes=64 << 10, progress=False)
    real_encode = streaming._Encoder.encode
    calls = []

    def interrupted_encode(self, task):
        calls.append(1)
        if len(calls) == 25:  # after a few shards are complete, one is half written
            raise KeyboardInterrupt
        return real_encode(self, task)

    monkeypatch.setattr(streaming._Encoder, "encode", interrupted_encode)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(sources, out, **options)
    monkeypatch.undo()
    names = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in names and not [n for n in names if n.endswith(".tmp")]
    assert names and all((out / n).stat().st_size == 200_000 for n in names)  # only whole shards
    with pytest.raises(ValueError, match="holds no meta.json"):
        open_corpus(out)
    # What a process killed outright leaves: a temporary file, and shards of a longer corpus.
    (out / ".train_000002.bin.x1y2.tmp").write_bytes(b"partial")
    (out / "train_000999.bin").write_bytes(b"old")
    (out / "notes.txt").write_text("not ours")
    prepare_corpus(sources, out, **options)
    assert shard_bytes(out) == {**shard_bytes(prepared[0] / "w1"), "notes.txt": b"not ours"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_a_stopped_command_leaves_no_corpus_and_no_worker(tmp_path, sig):
    from fastgpt_kernels import _processes

    rng = random.Random(3)
    for i in range(3):
        write(tmp_path / "src" / f"{i}.txt", random_text(rng, 2000) * 40)  # about 8 MB each
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastgpt.prepare", str(tmp_path / "src"), "--out", str(out), "--workers", "2",
           "--shard_tokens", "100000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # As from a terminal: SIGINT at its default, even where this test runs with it ignored (a
    # background job of a script), which a child would inherit and then never see Ctrl-C.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and any(out.glob("train_*.bin"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        workers = _processes.descendants(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert len(workers) >= 2
    assert_processes_end(workers, 5, f"workers of the command stopped by {sig.name}")
    names = sorted(p.name for p in out.iterdir())
    assert "meta.json" not in names
    if sig == signal.SIGKILL:  # no say for the command: at most a temporary file left, no corpus
        return
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in err and "starts clean" in err
    assert not [n for n in names if n.endswith(".tmp")], (names, err)
    assert all((out / n).stat().st_size == 200_000 for n in names)


def bad_inputs(tmp: Path) -> list:
    (tmp / "bad_utf8.txt").write_bytes(b"line one\nline two\nline \xff three\n")
    (tmp / "bad_utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    write(tmp / "not_json.jsonl", '{"text": "ok"}\n\n{"text": "unterminated}\n')
    write(tmp / "no_field.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"body": "where is the text?"}\n')
    write(tmp / "not_object.jsonl", '["a", "list"]\n')
    write(tmp / "not_string.jsonl", '{"text": "ok"}\n{"text": 42}\n')
    (tmp / "broken.txt.gz").write_bytes(b"this is not gzip data")
    write(tmp / "table.csv", "a,b\n")
    (tmp / "only_csv").mkdir()
    write(tmp / "only_csv" / "x.csv", "a,b\n")
    write(tmp / "wide.txt", "".join(chr(0x10000 + i) for i in range(70_000)))
    return [
        ([str(tmp / "nothing" / "*.txt")], "no input: source .*nothing/\\*.txt' matches no .txt, .md or .jsonl"),
        ([str(tmp / "only_csv")], "no input: source .*only_csv' matches no"),
        ([str(tmp / "missing.txt")], "source .*missing.txt' does not exist"),
        ([str(tmp / "table.csv")], "table.csv: unsupported file type"),
        ([str(tmp / "bad_utf8.txt")], "bad_utf8.txt:3: invalid UTF-8 \\(byte 0xff at column 6\\)"),
        ([str(tmp / "bad_utf8.jsonl")], "bad_utf8.jsonl:2: invalid UTF-8"),
        ([str(tmp / "not_json.jsonl")], "not_json.jsonl:3: not valid JSON \\(Unterminated string"),
        ([str(tmp / "no_field.jsonl")], "no_field.jsonl:3: the JSON object has no 'text' field \\(its fields: 'body'"),
        ([str(tmp / "not_object.jsonl")], "not_object.jsonl:1: expected a JSON object with a 'text' field, got a JSON "
                                           "list"),
        ([str(tmp / "not_string.jsonl")], "not_string.jsonl:2: the 'text' field is a JSON int, not a string"),
        ([str(tmp / "broken.txt.gz")], "broken.txt.gz is not a valid gzip file"),
        ([str(tmp / "wide.txt"), "--tokenizer", "char"], "vocab_size 70001 does not fit the uint16 token files"),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_inputs_get_messages_that_name_the_file_and_line(tmp_path, capsys, workers):
    for args, message in bad_inputs(tmp_path):
        assert prepare_command.main([*args, "--out", str(tmp_path / "out"), "--workers", str(workers)]) == 2, args
        err = capsys.readouterr().err
        assert re.search("error: .*" + message, err), (message, err)
        assert not (tmp_path / "out" / "meta.json").exists()


def test_line_numbers_count_across_pieces(tmp_path):
    lines = [f"line {i} of a long file." for i in range(1, 5001)]
    data = "\n".join(lines).encode()
    data = data.replace(b"line 4321 ", b"line \xc3\x28 ")  # an invalid two-byte sequence on line 4321
    (tmp_path / "long.txt").write_bytes(data)
    with pytest.raises(ValueError, match=r"long.txt:4321: invalid UTF-8 \(byte 0xc3 at column 6\)"):
        prepare_corpus([tmp_path / "long.txt"], tmp_path / "out", chunk_bytes=1000, progress=False)


@pytest.mark.slow
def test_preparing_imports_no_torch_in_the_command_or_its_workers(tmp_path):
    """The command's processes hold no torch (about 335 MB each): an import of it fails, in any process."""
    rng = random.Random(5)
    write(tmp_path / "src" / "a.txt", random_text(rng, 3000))
    write(tmp_path / "src" / "b.jsonl", jsonl({"text": random_text(rng, 20)} for _ in range(50)))
    # Every interpreter of the command runs sitecustomize (workers started by fork inherit it).
    write(tmp_path / "site" / "sitecustomize.py", """
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            print("imported", name, file=sys.stderr)
            raise ImportError(name)


sys.meta_path.insert(0, NoTorch())
""")
    code = f"""
        import sys
        assert "sitecustomize" in sys.modules
        import multiprocessing
        multiprocessing.set_start_method("forkserver")  # Python 3.14's default on Linux: the workers fork anyway
        from fastgpt.prepare import main
        for kind in ("gpt2", "char"):
            status = main([{str(tmp_path / "src")!r}, "--out", {str(tmp_path)!r} + "/" + kind, "--workers", "2",
                           "--tokenizer", kind, "--shard_tokens", "20000"])
            assert status == 0, status
        """
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    result = run_python(code, PYTHONPATH=path)
    assert result.returncode == 0 and "imported" not in result.stderr, result.stderr
    for kind in ("gpt2", "char"):
        assert open_corpus(tmp_path / kind).num_tokens("train") > 20000


def parquet_file(path: Path, columns: dict, row_group_size: int) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.mark.parametrize("workers", [1, 2])
def test_parquet_rows_are_documents_with_the_shards_of_the_same_jsonl(tmp_path, workers):
    rng = random.Random(3)
    texts = [random_text(rng, rng.randint(1, 40)) for _ in range(400)]
    texts[5] = texts[77] = ""  # empty documents are skipped, as in JSONL
    parquet_file(tmp_path / "rows.parquet", {"id": list(range(400)), "content": texts}, row_group_size=37)
    write(tmp_path / "rows.jsonl", jsonl([{"content": t} for t in texts]))
    options = dict(text_field="content", val_fraction=0.2, shard_tokens=20_000, chunk_bytes=2048, progress=False)
    meta = prepare_corpus([tmp_path / "rows.parquet"], tmp_path / "from_parquet", workers=workers, **options)
    prepare_corpus([tmp_path / "rows.jsonl"], tmp_path / "from_jsonl", **options)
    # A row is split by its number as a JSONL document by its line: the same documents, split alike.
    parquet_shards = {n: b for n, b in shard_bytes(tmp_path / "from_parquet").items() if n.endswith(".bin")}
    jsonl_shards = {n: b for n, b in shard_bytes(tmp_path / "from_jsonl").items() if n.endswith(".bin")}
    assert parquet_shards == jsonl_shards and len(parquet_shards) >= 4
    assert sum(meta["splits"][split]["documents"] for split in ("train", "val")) == 398
    assert meta["sources"][0]["format"] == "parquet"


def test_parquet_inputs_get_messages_that_name_the_file_and_row(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    parquet_file(tmp_path / "no_text.parquet", {"body": ["a", "b"]}, 10)
    parquet_file(tmp_path / "numbers.parquet", {"text": [1, 2]}, 10)
    parquet_file(tmp_path / "null.parquet", {"text": ["a", "b", "c", None, "e"]}, 2)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a Parquet file")
    write(tmp_path / "squeezed.parquet.gz", "x")
    cases = [
        ("no_text.parquet", "no_text.parquet: no column 'text' \\(its columns: 'body'\\); choose the column with "
                            "--text_field"),
        ("numbers.parquet", "numbers.parquet: the 'text' column holds int64, not strings"),
        ("null.parquet", "null.parquet, row 4: the 'text' column is null"),
        ("broken.parquet", "broken.parquet is not a valid Parquet file"),
        ("squeezed.parquet.gz", "squeezed.parquet.gz: unsupported file type"),
    ]
    for name, message in cases:
        assert prepare_command.main([str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert re.search("error: .*" + message, err), (message, err)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert prepare_command.main([str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "out")]) == 2
    assert "reading .parquet files needs pyarrow: pip install 'fastgpt[parquet]'" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_named(tmp_path):
    write(tmp_path / "secret.txt", "text")
    (tmp_path / "secret.txt").chmod(0)
    with pytest.raises(OSError, match="cannot read .*secret.txt"):
        prepare_corpus([tmp_path / "secret.txt"], tmp_path / "out", progress=False)


def test_open_corpus_refuses_what_is_not_a_whole_corpus(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(ValueError, match="holds no meta.json"):
        open_corpus(tmp_path)
    meta = json.loads((out / "w1" / "meta.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train_000000.bin", "val_000000.bin"):
        (bad / name).write_bytes((out / "w1" / name).read_bytes()[:-2])  # a shard one token short
    (bad / "meta.json").write_text(json.dumps({**meta, "splits": {
        split: {**meta["splits"][split], "shards": meta["splits"][split]["shards"][:1]} for split in meta["splits"]}}))
    with pytest.raises(ValueError, match=r"train_000000.bin has 199998 bytes, expected 200000"):
        open_corpus(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="corpus format version 99; this fastgpt reads 1"):
        open_corpus(bad)


def test_load_dataset_takes_a_prepared_directory_with_its_tokenizer(prepared, tmp_path):
    out, metas = prepared
    dataset = load_dataset(out / "w1", tokenizer_kind="char")  # the directory's tokenizer wins
    assert dataset.tokenizer == GPT2Tokenizer() and not dataset.is_task
    assert f"train_tokens={metas[1]['splits']['train']['tokens']}" in repr(dataset)
    x, y = dataset.get_batch("val", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32)
    with pytest.raises(ValueError, match="was prepared with GPT2Tokenizer.*not the given tokenizer CharTokenizer"):
        load_dataset(out / "w1", tokenizer=open_corpus_char(tmp_path).tokenizer)
    write(tmp_path / "one.txt", "a single document never fills both splits\n")
    prepare_corpus([tmp_path / "one.txt"], tmp_path / "one", val_fraction=0.0, progress=False)
    with pytest.raises(ValueError, match="has no validation tokens.*1 documents.*larger --val_fraction"):
        load_dataset(tmp_path / "one")


def open_corpus_char(tmp_path):
    write(tmp_path / "c.txt", "abc")
    prepare_corpus([tmp_path / "c.txt"], tmp_path / "c", tokenizer="char", progress=False)
    return open_corpus(tmp_path / "c")


def test_train_from_a_prepared_directory_and_resume_exactly(tmp_path, capsys):
    rng = random.Random(4)
    for i in range(40):
        write(tmp_path / "src" / f"{i:02d}.txt", random_text(rng, 40))
    assert prepare_command.main([str(tmp_path / "src"), "--out", str(tmp_path / "corpus"), "--tokenizer", "char",
                                 "--val_fraction", "0.2", "--shard_tokens", "5000"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"pass 1 of 2 \(characters\): .* MB/s\n", err)  # the progress line, on stderr
    assert re.search(r"pass 2 of 2 \(tokens\): [0-9.]+/[0-9.]+ MB \(100%\) [0-9.]+ MB/s, [0-9,]+ tokens", err)
    assert re.search(r"40 file\(s\), [0-9.]+ MB in [0-9.]+ s: [0-9.]+ MB/s with 1 worker\(s\)", out)
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert len(meta["splits"]["train"]["shards"]) > 3 and meta["splits"]["val"]["tokens"] > 100
    tiny = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
            "--eval_iters", "2", "--log_interval", "1", "--sample_tokens", "0", "--backend", "torch",
            "--dtype", "float32", "--warmup_iters", "2", "--lr_decay_iters", "8", "--eval_interval", "4",
            "--dataset", str(tmp_path / "corpus")]

    def losses(out):
        records = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if "loss" in r}

    assert training.main([*tiny, "--max_iters", "8", "--out_dir", str(tmp_path / "straight")]) == 0
    assert training.main([*tiny, "--max_iters", "4", "--out_dir", str(tmp_path / "resumed")]) == 0
    assert training.main([*tiny, "--max_iters", "8", "--out_dir", str(tmp_path / "resumed"), "--resume"]) == 0
    assert sorted(losses("resumed")) == list(range(1, 9))
    assert losses("resumed") == losses("straight")
    assert checkpoint.load(tmp_path / "resumed" / "last.pt")["tokenizer"] == meta["tokenizer"]
