"""fastgpt.data: tokenizers (char and offline GPT-2), prepared token files and their cache, batches,
the synthetic addition and sort tasks with their held-out problems, and load_dataset."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastgpt_kernels
from fastgpt import data
from fastgpt.data import corpora
from fastgpt.data import (AdditionTask, CharTokenizer, GPT2Tokenizer, SortTask, get_batch, load_dataset,
                          prepare_text, tokenizer_from_dict)

REPO_ROOT = Path(__file__).resolve().parent.parent


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def write_text(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- tokenizers

def test_char_tokenizer_round_trip_and_sorted_vocabulary():
    tok = CharTokenizer("hello, wörld\n")
    assert tok.chars == "".join(sorted(set("hello, wörld\n")))
    assert tok.vocab_size == len(set("hello, wörld\n"))
    ids = tok.encode("world, hello")
    assert ids == [tok.chars.index(c) for c in "world, hello"]
    assert tok.decode(ids) == "world, hello"
    assert tok.decode(torch.tensor(ids)) == "world, hello"
    assert tok.encode("") == []


def test_char_tokenizer_saves_and_restores_through_json():
    tok = CharTokenizer("the quick brown fox — naïve\t")
    restored = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert isinstance(restored, CharTokenizer)
    assert restored == tok
    assert restored.encode("fox — naïve") == tok.encode("fox — naïve")


def test_char_tokenizer_names_characters_outside_the_vocabulary():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\) outside the vocabulary of 3: 'x', 'é'"):
        tok.encode("abxé")
    with pytest.raises(ValueError, match=r"'1', '2', '3', '4', '5', \.\.\."):
        tok.encode("123456789")


def test_char_tokenizer_rejects_bad_dicts_and_ids():
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer.from_dict({"kind": "char", "chars": "ba"})
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        tokenizer_from_dict({"kind": "bpe"})
    with pytest.raises(ValueError, match="token id 3 is out of range for vocab_size 3"):
        CharTokenizer("abc").decode([0, 3])
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")


def test_gpt2_known_ids_and_special_token_handling():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257
    assert tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    # Plain encode never produces the end-of-text token; only the explicit method does.
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert tok.encode_with_eot("a<|endoftext|>b") == [64, 50256, 65]
    assert tokenizer_from_dict(json.loads(json.dumps(tok.to_dict()))) == tok


@pytest.mark.parametrize("text", [
    "Hello world",
    "naïve café — 日本語 🙂 Ünïcödé\n\n\ttabs  and   spaces ",
    "x = [i ** 2 for i in range(10)]  # it's fine, isn't it?\n",
])
def test_gpt2_round_trip(text):
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_gpt2_encoding_is_built_without_network(tmp_path):
    # A fresh interpreter with bogus proxies, an empty tiktoken cache and sockets that refuse to
    # connect: building the encoding must still work, and must not even try to connect.
    script = textwrap.dedent("""
        import json, socket
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from fastgpt.data import GPT2Tokenizer
        tok = GPT2Tokenizer()
        print(json.dumps({"ids": tok.encode("Hello world"), "attempts": len(attempts)}))
    """)
    proxy = "http://127.0.0.1:9"
    env = {**os.environ, "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "ALL_PROXY": proxy, "https_proxy": proxy,
           "http_proxy": proxy, "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken-cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ids": [15496, 995], "attempts": 0}
    assert not (tmp_path / "tiktoken-cache").exists()


# ----------------------------------------------------------------------------- prepared text

def test_prepare_text_writes_uint16_splits_and_meta(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000)) + "é"
    src = write_text(tmp_path / "tiny.txt", text)
    prepared = prepare_text(src, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert prepared.directory.parent == tmp_path / "cache"
    assert prepared.directory.name.startswith("tiny-") and prepared.directory.name.endswith("-char")
    assert isinstance(prepared.train, np.memmap) and prepared.train.dtype == np.uint16
    assert (len(prepared.train), len(prepared.val)) == (901, 100)
    assert (prepared.directory / "train.bin").stat().st_size == 2 * 901
    tok = prepared.tokenizer
    assert tok.decode(prepared.train) + tok.decode(prepared.val) == text
    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert meta["tokenizer"] == tok.to_dict()
    assert (meta["train_tokens"], meta["val_tokens"]) == (901, 100)
    assert meta["source"] == str(src.resolve())
    assert sorted(p.name for p in prepared.directory.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_text_with_gpt2_tokens(tmp_path):
    text = "Hello world. " * 50
    prepared = prepare_text(write_text(tmp_path / "hello.txt", text), "gpt2", tmp_path / "cache")
    assert isinstance(prepared.tokenizer, GPT2Tokenizer)
    tokens = np.concatenate([prepared.train, prepared.val]).tolist()
    assert tokens == GPT2Tokenizer().encode(text)
    assert prepared.directory.name.endswith("-gpt2")


def _stamps(directory: Path):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_prepare_text_reuses_cache_and_redoes_it_when_the_source_changes(tmp_path):
    src = write_text(tmp_path / "src.txt", "abcdefghij" * 20)
    first = prepare_text(src, cache_dir=tmp_path)
    before = _stamps(first.directory)
    again = prepare_text(src, cache_dir=tmp_path)
    assert again.directory == first.directory
    assert _stamps(again.directory) == before  # nothing rewritten
    # Same size, same characters, different content: only the content hash tells.
    write_text(src, "jihgfedcba" * 20)
    changed = prepare_text(src, cache_dir=tmp_path)
    assert changed.directory == first.directory
    assert changed.tokenizer.decode(changed.train[:10]) == "jihgfedcba"
    # Different settings are prepared again too.
    assert len(prepare_text(src, cache_dir=tmp_path, val_fraction=0.5).val) == 100


def test_interrupted_prepare_is_never_trusted(tmp_path, monkeypatch):
    src = write_text(tmp_path / "src.txt", "0123456789" * 30)
    first = prepare_text(src, cache_dir=tmp_path / "cache")
    write_text(src, "9876543210" * 30)
    real_writer = corpora.atomic_writer

    @contextlib.contextmanager
    def crash_on_val(path):
        with real_writer(path) as f:
            yield f
            if path.name == "val.bin":
                raise KeyboardInterrupt

    monkeypatch.setattr(corpora, "atomic_writer", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare_text(src, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert sorted(p.name for p in first.directory.iterdir()) == ["train.bin", "val.bin"]  # no meta, no temp files
    redone = prepare_text(src, cache_dir=tmp_path / "cache")
    assert redone.tokenizer.decode(np.concatenate([redone.train, redone.val])) == "9876543210" * 30


def test_prepare_text_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_text(missing, cache_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        prepare_text(empty, cache_dir=tmp_path)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="blob.bin.* is not UTF-8 text"):
        prepare_text(binary, cache_dir=tmp_path)
    nuls = tmp_path / "zeros.dat"
    nuls.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="zeros.dat.* is not UTF-8 text"):
        prepare_text(nuls, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a regular file"):
        prepare_text(tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="tokenizer_kind must be one of"):
        prepare_text(binary, tokenizer_kind="bytes", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare_text(binary, cache_dir=tmp_path, val_fraction=1.0)


def test_prepare_text_refuses_vocabularies_beyond_uint16(tmp_path):
    src = write_text(tmp_path / "wide.txt", "".join(chr(0x10000 + i) for i in range(70_000)))
    with pytest.raises(ValueError, match="vocab_size 70000 does not fit the uint16"):
        prepare_text(src, cache_dir=tmp_path)


def test_default_corpus_is_a_few_megabytes_of_stdlib_source(tmp_path):
    text = data.default_corpus_text()
    size = len(text.encode("utf-8"))
    assert 1_000_000 < size <= 3_000_000
    assert text.startswith("# ") and "\ndef " in text
    assert data.default_corpus_text(200_000) == data.default_corpus_text(200_000)  # deterministic
    dataset = load_dataset("default", cache_dir=tmp_path)
    assert isinstance(dataset.tokenizer, CharTokenizer) and dataset.vocab_size < 1000
    assert len(dataset.data.train) + len(dataset.data.val) == len(text)
    x, y = dataset.get_batch("val", 4, 64, gen())
    assert x.shape == y.shape == (4, 64)


# ----------------------------------------------------------------------------- batches

def test_get_batch_windows_are_shifted_and_reproducible():
    tokens = np.arange(1000, dtype=np.uint16)
    g = gen(3)
    state = g.get_state()
    x, y = get_batch(tokens, 8, 16, g)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous windows of the data
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    g.set_state(state)
    x2, y2 = get_batch(tokens, 8, 16, g)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get_batch(tokens, 8, 16, gen(3))
    assert torch.equal(x, x3)
    x4, _ = get_batch(tokens, 8, 16, gen(4))
    assert not torch.equal(x, x4)


def test_get_batch_uses_the_whole_split_including_its_last_token():
    tokens = np.arange(6, dtype=np.uint16)
    seen = set()
    g = gen()
    for _ in range(30):
        _, y = get_batch(tokens, 4, 5, g)
        seen.update(y[:, -1].tolist())
    assert seen == {5}


def test_get_batch_across_shards_keeps_each_window_inside_one_shard():
    # Token values tell the shard: 0.., 1000.. (too short for a window), 2000..
    shards = [np.arange(100, dtype=np.uint16), np.arange(1000, 1005, dtype=np.uint16),
              np.arange(2000, 2300, dtype=np.uint16)]
    g = gen(5)
    state = g.get_state()
    xs = torch.cat([get_batch(shards, 64, 8, g)[0] for _ in range(50)])  # 3200 windows
    assert torch.equal(xs, xs[:, :1] + torch.arange(8))  # contiguous: never across a shard boundary
    first = xs[:, 0]
    in_a, in_c = (first < 100), (first >= 2000)
    assert bool((in_a | in_c).all())  # the short shard is never drawn
    assert bool((xs[in_a] < 100).all()) and bool((xs[in_c] < 2300).all())
    # Shards are drawn in proportion to their windows: 92 and 292 of 384.
    assert abs(in_a.float().mean().item() - 92 / 384) < 0.03
    assert set(first[in_a].tolist()) == set(range(92))  # every window start of the shard occurs
    g.set_state(state)
    assert torch.equal(get_batch(shards, 64, 8, g)[0], xs[:64])  # reproducible from the generator state
    # One shard in a list draws exactly what the bare array draws.
    assert torch.equal(get_batch([shards[2]], 16, 8, gen(1))[0], get_batch(shards[2], 16, 8, gen(1))[0])
    with pytest.raises(ValueError, match=r"the split's longest shard has 300 tokens, too few for block_size=300"):
        get_batch(shards, 2, 300, gen())


def test_get_batch_on_a_split_shorter_than_a_block_names_block_size(tmp_path):
    prepared = prepare_text(write_text(tmp_path / "short.txt", "abcdefghij"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"the split has 9 tokens, too few for block_size=16.*block_size <= 8"):
        prepared.get_batch("train", 2, 16, gen())
    x, _ = prepared.get_batch("train", 2, 8, gen())
    assert x.shape == (2, 8)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        prepared.get_batch("test", 2, 8, gen())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        get_batch(np.arange(100, dtype=np.uint16), 2, 8, 123)


# ----------------------------------------------------------------------------- synthetic tasks

def addition_answer(prompt: str, digits: int) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b)).zfill(digits + 1)[::-1]


def sort_answer(prompt: str) -> str:
    return "".join(sorted(prompt.rstrip(SortTask.SEPARATOR)))


class Oracle:
    """A stand-in model whose generate() writes ``answer(prompt)`` (or garbage) after each prompt."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.prompts = tokenizer, answer, []

    def generate(self, idx, max_new_tokens, top_k=None):
        assert top_k == 1
        rows = []
        for row in idx.tolist():
            prompt = self.tokenizer.decode(row)
            self.prompts.append(prompt)
            new = self.tokenizer.encode(self.answer(prompt))
            assert len(new) == max_new_tokens
            rows.append(row + new)
        return torch.tensor(rows)


def full_sequences(x, y):
    return torch.cat([x, y[:, -1:]], dim=1)


def test_addition_batches_mask_the_prompt_and_are_correct_sums():
    task = AdditionTask(digits=2)
    assert (task.prompt_len, task.answer_len, task.block_size) == (6, 3, 8)
    x, y = task.get_batch(64, gen())
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == torch.int64
    assert (y[:, :5] == -1).all() and (y[:, 5:] >= 0).all()
    seqs = full_sequences(x, y)
    assert torch.equal(y[:, 5:], seqs[:, 6:])
    for row in seqs.tolist():
        text = task.tokenizer.decode(row)
        prompt, answer = text[:6], text[6:]
        assert prompt[2] == "+" and prompt[5] == "=", text
        assert answer == addition_answer(prompt, 2), text


def test_addition_held_out_problems_never_appear_in_training():
    task = AdditionTask(digits=2)
    g = gen(1)
    trained = set()
    for _ in range(30):
        x, _ = task.get_batch(500, g)
        trained.update(task.tokenizer.decode(row)[:5] for row in x.tolist())
    pairs = {(int(p[:2]), int(p[3:])) for p in trained}
    assert not any(task.is_held_out(a, b) for a, b in pairs)
    assert len(pairs) > 6500  # training does cover the rest (about 7300 of 9000 expected)
    held = {(a, b) for a in range(100) for b in range(100) if task.is_held_out(a, b)}
    assert 700 < len(held) < 1300
    xv, yv = task.get_batch(500, g, split="val")
    val_pairs = {(int(p[:2]), int(p[3:5])) for p in (task.tokenizer.decode(r) for r in xv.tolist())}
    assert val_pairs <= held


def test_addition_evaluate_scores_oracle_and_garbage():
    task = AdditionTask(digits=3)
    oracle = Oracle(task.tokenizer, lambda p: addition_answer(p, 3))
    assert task.evaluate(oracle, 300, gen()) == 1.0
    assert all(task.is_held_out(int(p[:3]), int(p[4:7])) for p in oracle.prompts)
    assert len(oracle.prompts) == 300
    garbage = Oracle(task.tokenizer, lambda p: "++++")
    assert task.evaluate(garbage, 300, gen()) == 0.0
    off_by_one = Oracle(task.tokenizer, lambda p: "1" + addition_answer(p, 3)[1:])
    assert task.evaluate(off_by_one, 300, gen()) < 0.2


def test_sort_batches_mask_the_prompt_and_are_sorted():
    task = SortTask(length=6, alphabet="ABC")
    assert (task.prompt_len, task.answer_len, task.block_size) == (7, 6, 12)
    x, y = task.get_batch(64, gen())
    assert (y[:, :6] == -1).all() and (y[:, 6:] >= 0).all()
    for row in full_sequences(x, y).tolist():
        text = task.tokenizer.decode(row)
        assert len(text) == 13 and text[6] == "|" and set(text[:6]) <= set("ABC")
        assert text[7:] == "".join(sorted(text[:6])), text


def test_sort_held_out_sequences_never_appear_in_training():
    task = SortTask()
    g = gen(2)
    trained = set()
    for _ in range(20):
        x, _ = task.get_batch(500, g)
        trained.update(task.tokenizer.decode(row)[:6] for row in x.tolist())
    assert not any(task.is_held_out(s) for s in trained)
    held = [s for s in map(_base3, range(3 ** 6)) if task.is_held_out(s)]
    assert 40 < len(held) < 110
    assert len(trained) == 3 ** 6 - len(held)
    oracle = Oracle(task.tokenizer, sort_answer)
    assert task.evaluate(oracle, 200, gen()) == 1.0
    assert {p[:6] for p in oracle.prompts} <= set(held)
    assert task.evaluate(Oracle(task.tokenizer, lambda p: "CCCCCC"), 200, gen()) < 0.05


def _base3(i):
    return "".join("ABC"[(i // 3 ** k) % 3] for k in range(5, -1, -1))


def test_evaluate_runs_a_real_model_and_restores_training_mode():
    from fastgpt.model import GPT, GPTConfig

    task = SortTask(length=3, alphabet="AB")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task.vocab_size, block_size=task.block_size, n_layer=1, n_head=2, n_embd=16))
    model.train()
    with fastgpt_kernels.use_backend("torch"):
        accuracy = task.evaluate(model, 20, gen())
    assert 0.0 <= accuracy <= 1.0 and model.training


def test_task_arguments_are_checked():
    with pytest.raises(ValueError, match="digits must be at most 9"):
        AdditionTask(digits=10)
    with pytest.raises(TypeError, match="digits must be an integer"):
        AdditionTask(digits=2.0)
    with pytest.raises(ValueError, match="separator"):
        SortTask(alphabet="AB|")
    with pytest.raises(ValueError, match="at least 2 distinct characters"):
        SortTask(alphabet="AA")


# ----------------------------------------------------------------------------- load_dataset

def test_load_dataset_names_and_paths(tmp_path):
    addition = load_dataset("addition", digits=1)
    assert addition.is_task and addition.vocab_size == 12 and addition.block_size == 5
    x, y = addition.get_batch("train", 4, 32, gen(), "cpu")
    assert x.shape == (4, 5)
    with pytest.raises(ValueError, match="need block_size >= 5"):
        addition.get_batch("train", 4, 4, gen())
    assert load_dataset("sort", length=4).block_size == 8
    with pytest.raises(ValueError, match="tokenizer_kind must be 'char'"):
        load_dataset("sort", tokenizer_kind="gpt2")
    src = write_text(tmp_path / "notes.txt", "some notes about nothing\n" * 20)
    text = load_dataset(src, cache_dir=tmp_path / "cache")
    assert not text.is_task and text.block_size is None
    assert text.vocab_size == len(set("some notes about nothing\n"))
    assert load_dataset(str(src), "gpt2", tmp_path / "cache").vocab_size == 50257
    with pytest.raises(ValueError, match=r"unknown dataset 'shakespeare'.*'default', 'addition', 'sort'"):
        load_dataset("shakespeare", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="apply only to the tasks"):
        load_dataset(src, cache_dir=tmp_path, digits=3)
