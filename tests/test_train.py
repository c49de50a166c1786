"""fastgpt.train and fastgpt.sample end to end: training, checkpoints, exact resume, DDP, errors.

Most runs use the PyTorch reference backend to stay fast; tests/test_model.py checks that the
Triton kernels and the references agree on the same model.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastgpt_kernels
from fastgpt import checkpoint, distributed, optim, perf, sample
from fastgpt import device as devices
from fastgpt import train as training
from fastgpt.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
        "--eval_iters", "2", "--log_interval", "1", "--sample_tokens", "0", "--backend", "torch",
        "--dtype", "float32", "--warmup_iters", "2"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    return path


def run_train(tmp_path, corpus, *extra, out="run"):
    args = ["--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / out),
            *TINY, *extra]
    return training.main(args)


def metrics(tmp_path, out="run"):
    return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_trains_logs_checkpoints_and_lowers_the_loss(tmp_path, corpus, capsys):
    assert run_train(tmp_path, corpus, "--max_iters", "60", "--eval_interval", "30", "--sample_tokens", "20") == 0
    records = metrics(tmp_path)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[0]["train_seconds"] == 0 < evals[1]["train_seconds"] < evals[2]["train_seconds"]
    assert all(r["tokens"] == r["step"] * 4 * 16 for r in records)  # batch 4 of 16 tokens a step
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert evals[-1]["val_loss"] < 0.8 * evals[0]["val_loss"]
    assert sorted(losses(records)) == list(range(1, 61))
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in records if "loss" in r)
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert state["step"] == 60 and state["model_config"]["n_embd"] == 32 and state["tokenizer"]["kind"] == "char"
    assert (tmp_path / "run" / "best.pt").is_file()
    err = capsys.readouterr().err
    assert "step     60/60" in err and "sample:" in err


# Under triton the kernels run (Triton's interpreter on a CPU), in a shorter run of a 1-layer model.
BACKEND_RUNS = {"torch": ["--backend", "torch"], "triton": ["--backend", "triton", "--n_layer", "1", "--eval_iters", "1"]}


@pytest.mark.slow
@pytest.mark.parametrize("backend, optimizer", [("torch", "adamw"), ("triton", "adamw"), ("torch", "muon")])
def test_resume_computes_the_same_losses_as_an_uninterrupted_run(tmp_path, corpus, backend, optimizer):
    # With dropout: the kernels' dropout seeds come from the RNG states a checkpoint restores.
    steps = 12 if backend == "torch" else 6
    common = ["--eval_interval", str(steps // 2), "--lr_decay_iters", str(steps), "--dropout", "0.1",
              "--optimizer", optimizer, *BACKEND_RUNS[backend]]
    assert run_train(tmp_path, corpus, *common, "--max_iters", str(steps), out="straight") == 0
    assert run_train(tmp_path, corpus, *common, "--max_iters", str(steps // 2), out="resumed") == 0
    assert run_train(tmp_path, corpus, *common, "--max_iters", str(steps), "--resume", out="resumed") == 0
    straight, resumed = losses(metrics(tmp_path, "straight")), losses(metrics(tmp_path, "resumed"))
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == straight  # bit for bit: same batches, dropout masks and optimizer state


def test_a_resumed_run_keeps_its_optimizer_and_schedule_unless_given_anew(tmp_path, corpus, capsys):
    common = ["--eval_interval", "2", "--lr_decay_iters", "4"]
    recipe = ["--optimizer", "muon", "--lr_schedule", "wsd"]
    assert run_train(tmp_path, corpus, *common, *recipe, "--max_iters", "4", out="straight") == 0
    assert run_train(tmp_path, corpus, *common, *recipe, "--max_iters", "2", out="resumed") == 0
    assert run_train(tmp_path, corpus, *common, "--max_iters", "4", "--resume", out="resumed") == 0
    assert losses(metrics(tmp_path, "resumed")) == losses(metrics(tmp_path, "straight"))
    capsys.readouterr()
    assert run_train(tmp_path, corpus, *common, "--max_iters", "6", "--resume", "--optimizer", "adamw",
                     out="resumed") == 2
    assert "resume with the run's own --optimizer" in capsys.readouterr().err


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from fastgpt import optim
    from fastgpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8))
    opt = optim.build(model, "muon", "cpu", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in opt.parts["muon"].param_groups for p in group["params"]}
    adamw = {names[id(p)] for group in opt.parts["adamw"].param_groups for p in group["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert adamw == set(names.values()) - muon  # embeddings (and the head tied to wte), LayerNorms, biases
    assert "transformer.wte.weight" in adamw and model.lm_head.weight is model.transformer.wte.weight
    opt.set_lr_factor(0.5)
    assert {g["lr"] for g in opt.parts["muon"].param_groups} == {0.01}
    assert {g["lr"] for g in opt.parts["adamw"].param_groups} == {5e-4}
    plain = optim.build(model, "adamw", "cpu", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    plain.load_state_dict(plain.parts["adamw"].state_dict())  # a checkpoint from before Muon: AdamW's alone
    with pytest.raises(ValueError, match="for adamw, this run uses adamw and muon"):
        opt.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_muon_with_wsd_trains_under_every_precision(tmp_path, corpus, dtype):
    """The CPU's precisions; float16 (GPUs only) takes the GradScaler path tested below."""
    assert run_train(tmp_path, corpus, "--optimizer", "muon", "--lr_schedule", "wsd", "--dtype", dtype,
                     "--max_iters", "30", "--eval_interval", "30", "--gradient_accumulation_steps", "2") == 0
    evals = [r for r in metrics(tmp_path) if "val_loss" in r]
    assert evals[-1]["val_loss"] < 0.8 * evals[0]["val_loss"], evals
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["train_config"]["optimizer"] == "muon"


@pytest.mark.parametrize("kind", optim.OPTIMIZERS)
def test_a_loss_scale_leaves_every_optimizers_step_as_it_was_and_an_inf_skips_them_all(kind):
    """float16 training's GradScaler path: gradients scaled by 2^16 are unscaled (before clipping)
    and every optimizer takes the unscaled step; an inf in any gradient skips every optimizer."""
    def step(scale: float | None, poison: bool = False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
        opt = optim.build(model, kind, "cpu", learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        idx = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(1))
        with fastgpt_kernels.use_backend("torch"):
            scaler.scale(model(idx, idx)[1]).backward()
        if poison:
            model.transformer.wte.weight.grad[0, 0] = float("inf")
        opt.unscale_(scaler)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(scaler)
        scaler.update()
        return model.state_dict()

    plain, scaled = step(None), step(2.0**16)
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.manual_seed(0)
    untouched = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)).state_dict()
    skipped = step(2.0**16, poison=True)
    assert all(torch.equal(skipped[name], untouched[name]) for name in untouched)


def test_without_matplotlib_the_loop_says_once_how_to_draw_its_metrics(tmp_path, corpus, capsys, monkeypatch):
    from fastgpt import plot

    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    assert run_train(tmp_path, corpus, "--max_iters", "4", "--eval_interval", "1") == 0
    assert capsys.readouterr().err.count("metrics.png not drawn: drawing needs matplotlib") == 1
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_sample_command(tmp_path, corpus, capsys, monkeypatch):
    assert run_train(tmp_path, corpus, "--max_iters", "40", "--eval_interval", "40") == 0
    capsys.readouterr()
    assert sample.main([str(tmp_path / "run"), "--prompt", "the ", "--max_new_tokens", "12", "--num_samples", "2",
                        "--backend", "torch"]) == 0
    samples = capsys.readouterr().out[:-1].split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("the ") and len(s) == 16 for s in samples), samples
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("the\nfox\n"))
    assert sample.main([str(tmp_path / "run" / "last.pt"), "--interactive", "--max_new_tokens", "5",
                        "--backend", "torch"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert sample.main([str(tmp_path / "run"), "--prompt", "QXZ", "--backend", "torch"]) == 2
    assert "'Q'" in capsys.readouterr().err


def test_the_end_of_training_sample_draws_without_dropout_and_leaves_the_model_training():
    """The loop's sample and the sample command share :func:`fastgpt.sample.complete`: it samples in eval
    mode (a model with heavy dropout draws what its eval-mode self draws) and restores the mode."""
    from fastgpt.data import CharTokenizer
    from fastgpt.model import GPT, GPTConfig

    tokenizer = CharTokenizer("abcdefgh")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.9))
    texts = []
    for training_mode in (True, False):
        model.train(training_mode)
        torch.manual_seed(1)
        texts.append(sample.complete(model, tokenizer, "ab", 10, 1.0, None, "cpu"))
        assert model.training is training_mode
    assert texts[0] == texts[1] and len(texts[0]) == 10


def test_finetune_from_a_checkpoint_keeps_its_tokenizer(tmp_path, corpus, capsys):
    assert run_train(tmp_path, corpus, "--max_iters", "10", "--eval_interval", "10", out="pre") == 0
    small = tmp_path / "small.txt"
    small.write_text("the lazy dog. " * 40)
    args = ["--init_from", str(tmp_path / "pre" / "last.pt"), "--learning_rate", "3e-4", "--min_lr", "3e-5",
            "--max_iters", "5", "--eval_interval", "5", "--dropout", "0.1"]
    assert run_train(tmp_path, small, *args, out="fine") == 0
    pre, fine = checkpoint.load(tmp_path / "pre" / "last.pt"), checkpoint.load(tmp_path / "fine" / "last.pt")
    assert fine["tokenizer"] == pre["tokenizer"] and fine["step"] == 5
    assert pre["model_config"]["dropout"] == 0.0 and fine["model_config"]["dropout"] == 0.1  # not a shape: may change
    outside = tmp_path / "outside.txt"
    outside.write_text("Zzz zzz " * 40)
    capsys.readouterr()
    assert run_train(tmp_path, outside, *args, out="bad") == 2
    assert "'Z'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend, optimizer", [("torch", "adamw"), ("triton", "adamw"), ("torch", "muon")])
def test_compiled_model_trains_as_the_eager_one(tmp_path, corpus, backend, optimizer):
    common = ["--max_iters", "3", "--eval_interval", "3", "--optimizer", optimizer, *BACKEND_RUNS[backend]]
    assert run_train(tmp_path, corpus, *common, "--compile", out="compiled") == 0
    assert run_train(tmp_path, corpus, *common, out="eager") == 0
    compiled, eager = losses(metrics(tmp_path, "compiled")), losses(metrics(tmp_path, "eager"))
    assert compiled[3] < 5
    assert compiled == pytest.approx(eager, rel=1e-4)  # fused differently by inductor: not bit for bit


@pytest.mark.slow
def test_recompute_trains_as_keeping_the_activations(tmp_path, corpus, capsys):
    # Under bfloat16 autocast, with dropout; tests/test_model.py covers both backends and float32.
    common = ["--max_iters", "3", "--eval_interval", "3", "--dropout", "0.1", "--dtype", "bfloat16"]
    for mode in ("none", "mlp", "block"):
        assert run_train(tmp_path, corpus, *common, "--recompute", mode, out=mode) == 0
    assert "recompute block (MFU counts the model's FLOPs only)" in capsys.readouterr().err
    kept = checkpoint.load(tmp_path / "none" / "last.pt")["model"]
    for mode in ("mlp", "block"):
        assert losses(metrics(tmp_path, mode)) == losses(metrics(tmp_path, "none"))
        assert_same_weights(checkpoint.load(tmp_path / mode / "last.pt")["model"], kept)


@pytest.mark.slow
def test_compiled_model_with_recompute_trains_as_the_eager_one(tmp_path, corpus):
    # Without dropout: inductor draws its own dropout masks, not eager PyTorch's.
    common = ["--max_iters", "3", "--eval_interval", "3", "--recompute", "block"]
    assert run_train(tmp_path, corpus, *common, "--compile", out="compiled") == 0
    assert run_train(tmp_path, corpus, *common, out="eager") == 0
    assert losses(metrics(tmp_path, "compiled")) == pytest.approx(losses(metrics(tmp_path, "eager")), rel=1e-4)


@pytest.mark.slow
def test_the_log_names_the_ops_pytorch_serves_and_compile_decides_first(tmp_path, corpus, capsys, monkeypatch):
    """Under auto the race (here on CPU tensors, with a stand-in timer in which PyTorch wins) decides
    before torch.compile traces the model, and the log says which ops PyTorch serves and why."""
    from fastgpt_kernels import _race

    monkeypatch.setattr(_race, "RACE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(_race, "time_side", lambda fn, device, side: (fn(), {"kernel": 2.0, "torch": 1.0}[side])[1])
    _race.forget()
    try:
        assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2", "--n_layer", "1",
                         "--eval_iters", "1", "--backend", "auto", "--compile") == 0
        decided = fastgpt_kernels.backend_decisions()
    finally:
        _race.forget()
    assert {d.op for d in decided} == {"layer_norm", "attention", "gelu_mlp", "linear_cross_entropy"}
    assert all(d.served == "torch" and d.why == "raced" for d in decided)
    err = capsys.readouterr().err
    for op in ("layer_norm", "attention", "gelu_mlp", "linear_cross_entropy"):
        assert f"kernels: {op} (" in err and "PyTorch serves (raced): kernel 2.000 ms, PyTorch 1.000 ms" in err
    assert err.index("kernels: layer_norm") < err.index("step 0:")  # decided before the first step


@pytest.mark.slow
def test_sort_task_is_learned(tmp_path):
    args = ["--dataset", "sort", "--out_dir", str(tmp_path / "sort"), *TINY, "--n_embd", "64", "--block_size", "13",
            "--batch_size", "64", "--optimizer", "adamw", "--learning_rate", "3e-3", "--min_lr", "3e-4",
            "--warmup_iters", "20", "--max_iters", "200", "--eval_interval", "200", "--log_interval", "50"]
    assert training.main(args) == 0
    assert [r for r in metrics(tmp_path, "sort") if "val_accuracy" in r][-1]["val_accuracy"] >= 0.99


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capsys, monkeypatch):
    assert run_train(tmp_path, corpus, "--max_iters", "4", "--eval_interval", "2") == 0
    good = checkpoint.load(tmp_path / "run" / "last.pt")
    real_forward = training.GPT.forward

    def forward(self, idx, targets=None, return_logits=False):
        logits, loss = real_forward(self, idx, targets, return_logits)
        return logits, loss * float("nan") if self.training else loss

    monkeypatch.setattr(training.GPT, "forward", forward)
    assert run_train(tmp_path, corpus, "--max_iters", "8", "--eval_interval", "2", "--resume") == 2
    assert "the loss became nan at step 4" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "run" / "last.pt")["step"] == good["step"] == 4


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path, corpus):
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"),
           "--out_dir", str(tmp_path / "run"), *TINY, "--max_iters", "100000", "--eval_interval", "100000"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(metrics(tmp_path)) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err
    assert 0 < checkpoint.load(tmp_path / "run" / "last.pt")["step"] < 100000


def torchrun(*args, timeout=300):
    """``python -m torch.distributed.run --nproc_per_node 2 *args`` on gloo, one thread a process."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], env={**_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def ddp_train(tmp_path, corpus, *extra, out):
    """Train in two processes (``TINY``, batch 4 each) into ``tmp_path / out``; returns the final weights."""
    torchrun(ROOT / "train.py", "--dataset", corpus, "--data_dir", tmp_path / "cache", "--out_dir", tmp_path / out,
             *TINY, *extra)
    return checkpoint.load(tmp_path / out / "last.pt")["model"]


def assert_same_weights(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **(tolerance or dict(rtol=0, atol=0)), msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "block"])
def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path, corpus, recompute):
    common = ["--max_iters", "4", "--eval_interval", "4", "--optimizer", "adamw", "--recompute", recompute]
    assert run_train(tmp_path, corpus, *common, "--batch_size", "8", out="one") == 0
    two = ddp_train(tmp_path, corpus, *common, out="two")
    assert_same_weights(two, checkpoint.load(tmp_path / "one" / "last.pt")["model"], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "two" / "metrics.jsonl").read_text().count('"step": 4, "loss"') > 1  # rank 0 logs


@pytest.mark.slow
def test_two_process_muon_takes_the_update_of_one_process_with_the_global_batch(tmp_path, corpus):
    """Muon orthogonalises the averaged gradient in bfloat16 (torch.optim.Muon), and Newton-Schulz
    magnifies the gradient's smallest directions several hundredfold: the all-reduce's last-bit
    differences reach a few percent of a matrix's update (measured up to 9% in 4 steps), never its
    size. Each rank orthogonalising its own gradient would be off by the update itself."""
    common = ["--max_iters", "4", "--eval_interval", "4", "--optimizer", "muon"]
    assert run_train(tmp_path, corpus, *common, "--batch_size", "8", "--max_iters", "0", out="init") == 0
    assert run_train(tmp_path, corpus, *common, "--batch_size", "8", out="one") == 0
    two = ddp_train(tmp_path, corpus, *common, out="two")
    one, init = (checkpoint.load(tmp_path / out / "last.pt")["model"] for out in ("one", "init"))
    muon = set(optim.muon_parameters(GPT(GPTConfig(**checkpoint.load(tmp_path / "one" / "last.pt")["model_config"]))))
    for name in one:
        update = (one[name] - init[name]).abs().max().item()
        off = (two[name] - one[name]).abs().max().item()
        assert update > 0 and off <= (0.25 if name in muon else 0.02) * update, (name, off, update)


RANK_DRAWS = """
import json, random, sys
import torch
import torch.distributed as dist
from fastgpt.distributed import seed_rank
from fastgpt_kernels.ops.attention import draw_rng_state

dist.init_process_group("gloo")
seed_rank(1337, dist.get_rank())
draws = {"dropout": (torch.nn.Dropout(0.5)(torch.ones(256)) > 0).tolist(),
         "attention_seed": draw_rng_state("cpu").tolist(),
         "python": random.random()}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, draws)
if dist.get_rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(gathered))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    script, result = tmp_path / "draws.py", tmp_path / "draws.json"
    script.write_text(RANK_DRAWS)
    torchrun(script, result)
    rank0, rank1 = json.loads(result.read_text())
    for name in ("dropout", "attention_seed", "python"):
        assert rank0[name] != rank1[name], name


DROPOUT_RUN = ["--dropout", "0.1", "--eval_interval", "2", "--lr_decay_iters", "4"]


@pytest.fixture(scope="module")
def ddp_dropout_run(tmp_path_factory):
    """A two-process run with dropout, 4 steps straight: (tmp_path, corpus, final weights)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    return tmp_path, corpus, ddp_train(tmp_path, corpus, *DROPOUT_RUN, "--max_iters", "4", out="straight")


@pytest.mark.slow
def test_two_process_run_with_dropout_is_reproducible(ddp_dropout_run):
    tmp_path, corpus, straight = ddp_dropout_run
    assert_same_weights(ddp_train(tmp_path, corpus, *DROPOUT_RUN, "--max_iters", "4", out="again"), straight)
    assert len(checkpoint.load(tmp_path / "again" / "last.pt")["rng"]["ranks"]) == 2


@pytest.mark.slow
def test_two_process_resume_gives_the_weights_of_an_uninterrupted_run(ddp_dropout_run):
    tmp_path, corpus, straight = ddp_dropout_run
    ddp_train(tmp_path, corpus, *DROPOUT_RUN, "--max_iters", "2", out="resumed")
    assert_same_weights(ddp_train(tmp_path, corpus, *DROPOUT_RUN, "--max_iters", "4", "--resume", out="resumed"),
                        straight)


@pytest.mark.slow
def test_resume_with_another_number_of_processes_reseeds_and_says_so(ddp_dropout_run, capsys):
    tmp_path, corpus, _ = ddp_dropout_run
    shutil.copytree(tmp_path / "straight", tmp_path / "one")
    assert run_train(tmp_path, corpus, *DROPOUT_RUN, "--max_iters", "6", "--resume", out="one") == 0
    assert "the checkpoint holds the random states of 2 process(es), this run has 1" in capsys.readouterr().err
    assert len(checkpoint.load(tmp_path / "one" / "last.pt")["rng"]["ranks"]) == 1


def test_checkpoint_with_the_old_single_process_rng_layout_resumes_exactly(tmp_path, corpus):
    common = ["--dropout", "0.1", "--eval_interval", "2", "--lr_decay_iters", "4"]
    assert run_train(tmp_path, corpus, *common, "--max_iters", "4", out="straight") == 0
    assert run_train(tmp_path, corpus, *common, "--max_iters", "2", out="old") == 0
    last = tmp_path / "old" / "last.pt"
    state = checkpoint.load(last)
    rng = state["rng"]
    state["rng"] = {**rng["ranks"][0], "batches": rng["batches"]}  # as written before per-rank states
    del state["precision"]
    checkpoint.save(last, state)
    assert run_train(tmp_path, corpus, *common, "--max_iters", "4", "--resume", out="old") == 0
    assert losses(metrics(tmp_path, "old")) == losses(metrics(tmp_path, "straight"))


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_and_saves_their_states(tmp_path, corpus):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), "--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"),
           "--out_dir", str(tmp_path / "run"), *TINY, "--max_iters", "100000", "--eval_interval", "100000"]
    proc = subprocess.Popen(cmd, env={**_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(metrics(tmp_path)) < 3:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # torchrun passes it on to both ranks
    _, err = proc.communicate(timeout=120)
    assert "interrupted at step" in err, err[-3000:]
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert 0 < state["step"] < 100000 and len(state["rng"]["ranks"]) == 2


X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("features, dtype, reason", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16", "auto: the CPU has avx512_bf16"),
    ({"avx2", "amx_tile", "amx_bf16", "avx512_bf16"}, "bfloat16", "auto: the CPU has amx_bf16"),
    ({"fp", "asimd", "bf16"}, "bfloat16", "auto: the CPU has bf16"),
    ({"avx2", "avx512f", "fma"}, "float32", "auto: the CPU has none of amx_bf16, avx512_bf16, bf16"),
    (set(), "float32", "auto: the CPU has none of amx_bf16, avx512_bf16, bf16"),
])
def test_auto_dtype_on_a_cpu_follows_its_bf16_feature_flags(monkeypatch, features, dtype, reason):
    monkeypatch.setattr(devices, "cpu_features", lambda: frozenset(features))
    cpu = torch.device("cpu")
    assert devices.auto_dtype(cpu) == (dtype, reason)
    assert devices.resolve_dtype("auto", cpu) == dtype


def test_cpu_features_reads_x86_flags_and_arm_features(tmp_path):
    (tmp_path / "x86").write_text(X86_CPUINFO)
    (tmp_path / "arm").write_text(ARM_CPUINFO)
    assert devices.cpu_features(tmp_path / "x86") == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert devices.cpu_features(tmp_path / "arm") == {"fp", "asimd", "sve", "bf16", "i8mm"}


def test_cpu_features_are_empty_off_linux_or_without_a_readable_cpuinfo(tmp_path, monkeypatch):
    (tmp_path / "x86").write_text(X86_CPUINFO)
    (tmp_path / "no_flags").write_text("processor\t: 0\n")
    assert devices.cpu_features(tmp_path / "missing") == frozenset()
    assert devices.cpu_features(tmp_path) == frozenset()  # a directory
    assert devices.cpu_features(tmp_path / "no_flags") == frozenset()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert devices.cpu_features(tmp_path / "x86") == frozenset()
    assert devices.auto_dtype(torch.device("cpu"))[0] == "float32"


def test_auto_dtype_gives_the_same_answer_on_every_call():
    cpu = torch.device("cpu")
    answers = {devices.resolve_dtype("auto", cpu) for _ in range(5)}
    has_bf16 = bool(devices.cpu_features() & set(devices.CPU_BF16_FLAGS))
    assert answers == {"bfloat16" if has_bf16 else "float32"}


def test_resume_with_dtype_auto_keeps_the_checkpoints_precision(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(devices, "cpu_features", lambda: frozenset())  # auto alone would pick float32
    assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2", "--dtype", "bfloat16") == 0
    assert checkpoint.load(tmp_path / "run" / "last.pt")["precision"] == "bfloat16"
    assert "precision bfloat16 (--dtype bfloat16)" in capsys.readouterr().err
    assert run_train(tmp_path, corpus, "--max_iters", "4", "--eval_interval", "2", "--dtype", "auto", "--resume") == 0
    assert "precision bfloat16 (auto on --resume: the checkpoint's)" in capsys.readouterr().err
    assert checkpoint.load(tmp_path / "run" / "last.pt")["precision"] == "bfloat16"
    assert run_train(tmp_path, corpus, "--max_iters", "1", "--dtype", "auto", out="fresh") == 0
    assert "precision float32 (auto: the CPU has none of" in capsys.readouterr().err


# CUDA-only paths, run on the CPU with torch.cuda's answers monkeypatched.

@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as on a machine with CUDA GPUs; returns a log of the calls that change its state."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    return calls


def test_resolve_device_picks_cuda_only_where_it_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda' requested but no CUDA device is available"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bf16_supported, dtype, scaled", [(True, "bfloat16", False), (False, "float16", True)])
def test_auto_dtype_on_a_gpu_is_bf16_where_supported_else_fp16_with_a_grad_scaler(fake_cuda, monkeypatch,
                                                                                  bf16_supported, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    gpu = torch.device("cuda")
    assert devices.resolve_dtype("auto", gpu) == dtype
    assert devices.resolve_dtype("float16", gpu) == "float16"  # allowed on a GPU, unlike on the CPU
    assert devices.grad_scaler(gpu, dtype).is_enabled() == scaled
    assert devices.grad_scaler(gpu, "float16").is_enabled()
    assert not devices.grad_scaler(gpu, "float32").is_enabled()


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),   # the SXM card names its memory, not its form factor
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "float16", 835e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A10G", "bfloat16", 70e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 312e12 / 16),
])
def test_peak_flops_looks_up_the_gpu_by_its_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert perf.peak_flops(torch.device("cuda"), dtype) == peak


def test_peak_flops_of_an_unknown_gpu_is_nan(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future Accelerator")
    assert math.isnan(perf.peak_flops(torch.device("cuda"), "bfloat16"))


@pytest.mark.parametrize("device_name, backend, device, set_device", [
    ("auto", "nccl", torch.device("cuda", 1), True),
    ("cuda", "nccl", torch.device("cuda", 1), True),
    ("cpu", "gloo", torch.device("cpu"), False),
])
def test_setup_distributed_under_torchrun_uses_nccl_and_the_local_rank_on_cuda(fake_cuda, monkeypatch, device_name,
                                                                              backend, device, set_device):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: fake_cuda.append(("init", backend)))
    ddp, got = distributed.setup_distributed(device_name)
    assert (ddp.rank, ddp.local_rank, ddp.world_size, ddp.master) == (3, 1, 4, False)
    assert got == device
    assert fake_cuda == [("set_device", device)] * set_device + [("init", backend)]


def test_rng_states_of_a_cuda_rank_are_saved_and_restored_for_its_own_device(fake_cuda, monkeypatch):
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": fake_cuda.append(("set", state, device)))
    gpu1 = torch.device("cuda", 1)
    saved = distributed.rng_state(gpu1)
    assert torch.equal(saved["cuda"], states[1]) and torch.equal(saved["torch"], torch.get_rng_state())
    distributed.restore_rng(saved, gpu1)
    assert fake_cuda == [("set", states[1], gpu1)]
    old_layout = {"torch": saved["torch"], "python": saved["python"], "batches": None, "cuda": [states[0], states[1]]}
    assert torch.equal(distributed.saved_rank_states(old_layout, gpu1)[0]["cuda"], states[1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert torch.equal(distributed.saved_rank_states(old_layout, torch.device("cuda"))[0]["cuda"], states[0])
    assert "cuda" not in distributed.saved_rank_states(old_layout, torch.device("cpu"))[0]


@pytest.mark.parametrize("args, message", [
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--dtype", "float16"], "float16 autocast is not supported on the CPU"),
    (["--dataset", "missing.txt"], "unknown dataset 'missing.txt'"),
    (["--block_size", "4000"], "block_size"),
    (["--resume"], "no checkpoint at"),
    (["--init_from", "README.md"], "README.md is not a readable fastgpt checkpoint"),
    (["--recompute", "all"], "unknown recompute 'all': expected one of none, mlp, block"),
])
def test_bad_input_gets_a_clear_error(tmp_path, corpus, capsys, args, message):
    argv = ["--dataset", str(corpus), "--data_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "run"),
            *TINY, "--max_iters", "1", *args]
    if args[0] == "--init_from":
        argv[-1] = str(ROOT / "README.md")
    assert training.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01\x02\xff" * 10, "UTF-8")])
def test_bad_data_file(tmp_path, capsys, content, message):
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    assert training.main(["--dataset", str(path), "--data_dir", str(tmp_path / "c"), *TINY]) == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_a_larger_block_size(tmp_path, corpus, capsys):
    assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2") == 0
    assert run_train(tmp_path, corpus, "--max_iters", "4", "--resume", "--block_size", "32") == 2
    assert "block_size 32 is larger than the checkpoint model's 16" in capsys.readouterr().err


def test_truncated_checkpoint_on_resume(tmp_path, corpus, capsys):
    assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2") == 0
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert run_train(tmp_path, corpus, "--max_iters", "4", "--resume") == 2
    assert "last.pt is not a readable fastgpt checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--no_such_option", "1"], ["--preset", "gpt5"]])
def test_unknown_option_or_preset(args, capsys):
    with pytest.raises(SystemExit) as exc:
        training.main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        training.main(["--help"])
    text = capsys.readouterr().out
    for name in ["n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "preset"] + \
            [f.name for f in training.dataclasses.fields(training.TrainConfig)]:
        assert f"--{name}" in text, name


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear"])
def test_learning_rate_schedule(schedule):
    cfg = training.TrainConfig(learning_rate=2.0, min_lr=0.2, warmup_iters=10, max_iters=110, lr_schedule=schedule,
                               decay_fraction=0.25)
    rates = [training.lr_factor(s, cfg) for s in range(120)]
    assert rates[0] < rates[5] < rates[9] < 1.0
    assert max(rates) <= 1.0 and abs(rates[10] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[110] == rates[119] == 0.1  # min_lr / learning_rate
    middle = rates[60]  # halfway through the decay's 100 steps
    expected = {"cosine": 0.1 + 0.9 * 0.5, "linear": 1 - 0.5 * 0.9, "wsd": 1.0}[schedule]
    assert abs(middle - expected) < 1e-9, (schedule, middle)
    if schedule == "wsd":  # the peak held for 75 steps, then 25 of linear decay
        assert rates[85] == 1.0 and abs(rates[98] - (1 - 13 / 25 * 0.9)) < 1e-9


def test_the_default_optimizer_is_muon_for_a_new_model_and_adamw_to_finetune(tmp_path, corpus):
    assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2", out="new") == 0
    new = checkpoint.load(tmp_path / "new" / "last.pt")
    assert new["train_config"]["optimizer"] == "muon" and set(new["optimizer"]) == {"muon", "adamw"}
    assert run_train(tmp_path, corpus, "--max_iters", "2", "--eval_interval", "2", "--init_from",
                     str(tmp_path / "new" / "last.pt"), out="tuned") == 0
    tuned = checkpoint.load(tmp_path / "tuned" / "last.pt")
    assert tuned["train_config"]["optimizer"] == "adamw" and set(tuned["optimizer"]) == {"adamw"}
    assert training.PRESETS["gpt2-124m"]["optimizer"] == "adamw"  # nanoGPT's recipe, as published


def test_bad_optimizer_and_schedule_options_are_refused_by_name():
    for bad, match in ((dict(optimizer="sgd"), "'sgd'"), (dict(lr_schedule="step"), "'step'"),
                       (dict(decay_fraction=0.0), "decay_fraction"), (dict(muon_momentum=1.0), "muon_momentum")):
        with pytest.raises(ValueError, match=match):
            training.TrainConfig(**bad)


def test_corpus_shorter_than_one_block(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("tiny text, far too short to hold a block of the requested length\n")
    assert training.main(["--dataset", str(path), "--data_dir", str(tmp_path / "c"), *TINY,
                          "--block_size", "64", "--max_iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "block_size" in err and "64" in err
