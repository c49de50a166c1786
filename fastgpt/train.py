"""The training loop: ``python train.py [options]`` (``--help`` lists them).

Reads top to bottom: configuration, data, model, optimizer, then the loop with gradient
accumulation, clipping, periodic evaluation, logging and checkpoints. The device and precision
come from :mod:`fastgpt.device`, the processes and their random states from
:mod:`fastgpt.distributed`. Multi-GPU and multi-node through ``torchrun`` (DistributedDataParallel:
nccl on CUDA, gloo on CPU); only rank 0 logs and saves.

A run is reproducible and resumable: batches come from a ``torch.Generator`` seeded alike on every
rank, dropout from each rank's own global generators (:func:`fastgpt.distributed.seed_rank`); the
batch generator's state, every rank's global RNG states, the model, optimizer, scaler and precision
are saved in every checkpoint, so ``--resume`` computes the same losses an uninterrupted run would.
Evaluation uses its own generator and does not disturb the training stream.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastgpt_kernels
from fastgpt import checkpoint, optim, perf, plot, pretrained
from fastgpt import eval as evaluation
from fastgpt.data import DATASET_NAMES, load_dataset, tokenizer_from_dict
from fastgpt.device import autocast_context, grad_scaler, run_dtype
from fastgpt.distributed import (Distributed, any_rank, from_rank0, gather_rng_states, resume_rng, seed_rank,
                                 setup_distributed)
from fastgpt.model import GPT, RECOMPUTE, GPTConfig
from fastgpt.sample import complete


@dataclass
class TrainConfig:
    """Everything about a run except the model's shape (see :class:`fastgpt.model.GPTConfig`)."""

    # data
    dataset: str = "default"        # "default" (Python's own stdlib source), "addition", "sort", a text file,
                                    # or a directory from python -m fastgpt.prepare (big corpora)
    tokenizer: str = "char"         # "char" or "gpt2" (text files; a prepared directory has its own)
    data_dir: str = "data_cache"    # where prepared token files are cached
    # output
    out_dir: str = "out"            # checkpoints (last.pt, best.pt) and metrics.jsonl
    resume: bool = False            # continue the run in out_dir from its last.pt
    init_from: str | None = None    # start a new run from these weights (finetuning): a checkpoint, or a
                                    # Hugging Face GPT-2 directory
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    eval_only: bool = False
    hellaswag: str | None = None    # HellaSwag's validation JSONL: acc and acc_norm logged with evaluations
    hellaswag_interval: int = 0     # score HellaSwag at the evaluations whose step is a multiple of this
                                    # (0: at every evaluation), and at the end
    sample_tokens: int = 200        # tokens sampled at the end of training (0: none)
    # optimisation
    batch_size: int = 12            # sequences per micro-step (per process)
    gradient_accumulation_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None   # default: max_iters
    lr_schedule: str = "cosine"     # "cosine", "wsd" (warmup-stable-decay) or "linear" (fastgpt/optim.py)
    decay_fraction: float = 0.2     # wsd: the last fraction of the steps after warmup, decaying to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0: no clipping
    optimizer: str = "auto"         # "muon": Muon on the blocks' matrices, AdamW on the rest (fastgpt/optim.py);
                                    # "adamw": AdamW on everything, as nanoGPT; "auto": muon for a new model,
                                    # adamw to finetune one (--init_from), a resumed run's own
    muon_lr: float = 0.02           # Muon's peak learning rate (the schedule scales it as learning_rate)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    # system
    device: str = "auto"            # "auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"             # "auto", "float32", "bfloat16", "float16"
    compile: bool = False           # run the model under torch.compile
    recompute: str = "none"         # "mlp" or "block": each block's MLP, or all of it, run again in the
                                    # backward instead of kept (less memory for a larger batch; more compute)
    backend: str = "auto"           # kernels backend: "auto", "triton", "torch"
    seed: int = 1337

    def __post_init__(self):
        for name in ("eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_tokens", "hellaswag_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr <= self.learning_rate):
            raise ValueError(f"need learning_rate > 0 and 0 <= min_lr <= learning_rate, got "
                             f"learning_rate={self.learning_rate}, min_lr={self.min_lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}")
        if self.optimizer not in ("auto", *optim.OPTIMIZERS):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: expected auto, {', '.join(optim.OPTIMIZERS)}")
        if self.lr_schedule not in optim.SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}: expected one of "
                             f"{', '.join(optim.SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if not (self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0):
            raise ValueError(f"need muon_lr > 0, 0 <= muon_momentum < 1 and muon_weight_decay >= 0, got "
                             f"{self.muon_lr}, {self.muon_momentum}, {self.muon_weight_decay}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"unknown recompute {self.recompute!r}: expected one of {', '.join(RECOMPUTE)}")
        if self.backend not in fastgpt_kernels.BACKENDS:
            raise ValueError(f"unknown kernels backend {self.backend!r}: expected auto, triton or torch")


# Defaults when no preset is named: a small model that trains in a few minutes on a CPU.
SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
# The GPT-2 presets train on the GPT-2 tokenizer, whose 50257 tokens are then the vocabulary (as in
# OpenAI's weights), not GPTConfig's 50304 padded for faster matmuls: such a model converts to the
# Hugging Face layout as it is, and never samples an id the tokenizer cannot decode. Optimisation as
# nanoGPT's GPT-2 small (AdamW; 12 x 40 sequences of 1024 tokens, about 0.5M tokens a step per
# process; Muon's learning rates are not tuned at these sizes); the larger sizes take the learning
# rates GPT-3 used for its nearest sizes (350M 3e-4, 760M 2.5e-4, 1.3B 2e-4: Brown et al. 2020,
# table 2.1), each decaying to a tenth.
_GPT2_TRAINING = dict(block_size=1024, dropout=0.0, tokenizer="gpt2", batch_size=12, gradient_accumulation_steps=40,
                      max_iters=600000, warmup_iters=2000, weight_decay=0.1, beta2=0.95, eval_interval=1000,
                      eval_iters=200, optimizer="adamw")
PRESETS = {
    "small": dict(SMALL),
    # The "Let's build GPT" lecture's model.
    "lecture": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                    learning_rate=3e-4, min_lr=3e-5, max_iters=5000, eval_interval=500, eval_iters=200),
    # GPT-2's four sizes as OpenAI released them (n_layer, n_head, n_embd; context 1024).
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, learning_rate=6e-4, min_lr=6e-5, **_GPT2_TRAINING),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, learning_rate=3e-4, min_lr=3e-5, **_GPT2_TRAINING),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, learning_rate=2.5e-4, min_lr=2.5e-5, **_GPT2_TRAINING),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, learning_rate=2e-4, min_lr=2e-5, **_GPT2_TRAINING),
}
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
# The optimisation recipe a resumed run keeps from its checkpoint unless an option sets it anew, and
# what checkpoints from before these options trained with.
RECIPE_FIELDS = ("optimizer", "lr_schedule", "decay_fraction", "muon_lr", "muon_momentum", "muon_weight_decay")
RECIPE_BEFORE_OPTIONS = {"optimizer": "adamw", "lr_schedule": "cosine"}
PLOT_SECONDS = 30.0  # out_dir/metrics.png is redrawn after an evaluation at most this often (and at the end)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------
# schedule, evaluation, progress
# ------------------------------------------------------------------------------------------------

def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at ``step`` as a fraction of the peak (:func:`fastgpt.optim.lr_factor`):
    warmup, then ``lr_schedule`` down to ``min_lr / learning_rate`` at ``lr_decay_iters``."""
    return optim.lr_factor(step, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters,
                           cfg.min_lr / cfg.learning_rate, cfg.lr_schedule, cfg.decay_fraction)


@torch.no_grad()
def evaluate(model, dataset, cfg: TrainConfig, block_size: int, device, amp) -> dict:
    """Mean loss over ``eval_iters`` batches of each split (and task accuracy), on fixed batches."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same batches at every evaluation
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = dataset.get_batch(split, cfg.batch_size, block_size, gen, device)
            with amp:
                losses.append(model(x, y)[1].item())
        out[f"{split}_loss"] = sum(losses) / len(losses)
    if dataset.is_task:
        raw = model.module if isinstance(model, DDP) else model
        out["val_accuracy"] = dataset.evaluate(getattr(raw, "_orig_mod", raw), n=500, device=device)
    model.train()
    return out


class Progress:
    """One status line (step, loss, lr, tokens/s): redrawn in place on a terminal, else printed
    every ``log_interval`` steps."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr
        self.live = self.stream.isatty()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float, final: bool = False):
        width = 24
        done = int(width * step / max(1, self.total))
        line = (f"step {step:>6}/{self.total} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f} "
                f"lr {lr:.2e} {tokens_per_s:,.0f} tok/s mfu {mfu * 100:.1f}%")
        if self.live:
            print("\r" + line, end="\n" if final else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def message(self, text: str):
        print(("\n" if self.live else "") + text, file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def _decide_backends(model, dataset, cfg: TrainConfig, block_size: int, device, amp) -> None:
    """One eager forward and backward of a training batch, so that ``auto`` decides which side serves
    each op (:func:`fastgpt_kernels.backend_decisions`) before torch.compile traces the model (it does
    not race while tracing). Its gradients are dropped; the run's batches and random numbers are untouched."""
    x, y = dataset.get_batch("train", cfg.batch_size, block_size, torch.Generator().manual_seed(cfg.seed), device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), amp:
        model(x, y)[1].backward()
    model.zero_grad(set_to_none=True)


def _say_backends(seen: int, say) -> int:
    """Say each decision made since the first ``seen`` where PyTorch serves an op, and why; returns
    how many decisions there are now."""
    decisions = fastgpt_kernels.backend_decisions()
    for decision in decisions[seen:]:
        if decision.served == "torch":
            say(f"kernels: {decision.describe()}")
    return len(decisions)


def _model_config(model_args: dict, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **{k: model_args[k] for k in MODEL_FIELDS if k in model_args})


def train(cfg: TrainConfig, model_args: dict, explicit: frozenset = frozenset()) -> dict:
    """Run training; returns the final metrics. ``model_args`` holds GPTConfig fields (no vocab);
    ``explicit`` names the options the user set (to refuse changing a resumed model's shape)."""
    ddp, device = setup_distributed(cfg.device)
    try:
        with fastgpt_kernels.use_backend(cfg.backend):
            return _train(cfg, model_args, explicit, ddp, device)
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, model_args: dict, explicit: frozenset, ddp: Distributed, device) -> dict:
    out_dir = Path(cfg.out_dir)
    seed_rank(cfg.seed, ddp.rank)
    progress = Progress(cfg.max_iters)
    say = progress.message if ddp.master else (lambda text: None)

    # --- checkpoint to start from, and the model's shape ------------------------------------
    start = None
    if cfg.resume and cfg.init_from:
        raise ValueError("--resume continues the run in out_dir; --init-from starts a new one: choose one")
    if cfg.resume:
        start = checkpoint.load(out_dir / "last.pt")
    elif cfg.init_from:
        start = (checkpoint.load(cfg.init_from) if Path(cfg.init_from).is_file()
                 else pretrained.as_checkpoint(cfg.init_from, GPT))
    if start is not None:
        saved = start["model_config"]
        for name in MODEL_FIELDS:
            if name in explicit and name not in ("block_size", "dropout") and model_args[name] != saved[name]:
                raise ValueError(f"--{name} {model_args[name]} differs from the checkpoint's {saved[name]}: "
                                 "a checkpoint's model keeps its shape")
        block_size = model_args["block_size"] if "block_size" in explicit else saved["block_size"]
        if block_size > saved["block_size"]:
            raise ValueError(f"block_size {block_size} is larger than the checkpoint model's "
                             f"{saved['block_size']}")
        model_args = {**{k: saved[k] for k in MODEL_FIELDS}, "block_size": block_size,
                      "dropout": model_args["dropout"] if "dropout" in explicit else saved["dropout"]}
    if cfg.resume:  # the run's own recipe, unless given anew (checkpoints before these options: AdamW, cosine)
        saved_recipe = {**RECIPE_BEFORE_OPTIONS, **start.get("train_config", {})}
        cfg = dataclasses.replace(cfg, **{name: saved_recipe[name] for name in RECIPE_FIELDS
                                          if name not in explicit and name in saved_recipe})
    if cfg.optimizer == "auto":  # Muon trains new models faster; finetuning keeps AdamW's small steps
        cfg = dataclasses.replace(cfg, optimizer="adamw" if cfg.init_from else "muon")
    dtype, dtype_reason = run_dtype(cfg.dtype, device, start.get("precision") if cfg.resume else None)
    amp = autocast_context(device, dtype)

    # --- data ---------------------------------------------------------------------------------
    tokenizer = tokenizer_from_dict(start["tokenizer"]) if start is not None else None
    dataset = load_dataset(cfg.dataset, cfg.tokenizer if tokenizer is None else start["tokenizer"]["kind"],
                           cfg.data_dir, tokenizer=tokenizer)
    if dataset.is_task and model_args["block_size"] < dataset.block_size:
        model_args = {**model_args, "block_size": dataset.block_size}
    block_size = dataset.block_size if dataset.is_task else model_args["block_size"]
    say(f"data: {dataset!r}")

    # --- model and optimizer ------------------------------------------------------------------
    vocab_size = dataset.vocab_size if start is None else start["model_config"]["vocab_size"]
    if vocab_size < dataset.vocab_size:
        raise ValueError(f"the model's vocabulary of {vocab_size} tokens is smaller than its tokenizer's "
                         f"{dataset.vocab_size}")
    if start is not None:
        model = GPT(_model_config({**start["model_config"], "dropout": model_args["dropout"]}, vocab_size))
        model.load_state_dict(start["model"])
        model.crop_block_size(model_args["block_size"])
    else:
        model = GPT(_model_config(model_args, vocab_size))
    model.to(device)
    model.recompute = cfg.recompute
    optimizer = optim.build(model, cfg.optimizer, device.type, learning_rate=cfg.learning_rate,
                            weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr,
                            muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay)
    scaler = grad_scaler(device, dtype)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    step, best_val = 0, float("inf")
    train_seconds = 0.0  # the run's time in training steps, evaluation left out (a resumed run's included)
    if cfg.resume:
        optimizer.load_state_dict(start["optimizer"])
        scaler.load_state_dict(start["scaler"])
        step, best_val = start["step"], start["best_val_loss"]
        train_seconds = start.get("train_seconds", 0.0)
        batch_gen.set_state(start["rng"]["batches"])
        resume_rng(start["rng"], ddp, device, cfg.seed, step, say)
        say(f"resumed from {out_dir / 'last.pt'} at step {step}")
    elif cfg.init_from:
        origin = f"step {start['step']} of its run" if "step" in start else "Hugging Face GPT-2 weights"
        say(f"initialised from {cfg.init_from} ({origin})")
    hellaswag = None
    if cfg.hellaswag:
        hellaswag = evaluation.read_hellaswag(cfg.hellaswag, dataset.tokenizer, model.config.vocab_size)
        say(f"hellaswag: {len(hellaswag)} examples from {cfg.hellaswag}")
    raw_model = model
    flops_per_token = perf.training_flops_per_token(perf.linear_weights(raw_model), raw_model.config.n_layer,
                                                    raw_model.config.n_embd, block_size)
    if cfg.compile:
        if cfg.backend == "auto":
            _decide_backends(raw_model, dataset, cfg, block_size, device, amp)
        model = torch.compile(model)
    if ddp.world_size > 1:
        model = DDP(model, device_ids=[ddp.local_rank] if device.type == "cuda" else None)
    say(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {raw_model.config}; device {device}, "
        f"precision {dtype} ({dtype_reason}), kernels backend {cfg.backend}"
        + ("" if cfg.recompute == "none" else f", recompute {cfg.recompute} (MFU counts the model's FLOPs only)"))

    def save(name: str) -> None:
        """Every rank calls it: each one's RNG states go into the checkpoint, which rank 0 writes."""
        rank_states = gather_rng_states(ddp, device)
        if not ddp.master:
            return
        checkpoint.save(out_dir / name, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "model_config": dataclasses.asdict(raw_model.config), "train_config": dataclasses.asdict(cfg),
            "tokenizer": dataset.tokenizer.to_dict(), "step": step, "best_val_loss": best_val,
            "train_seconds": train_seconds,
            "precision": dtype, "rng": {"batches": batch_gen.get_state(), "ranks": rank_states},
        })

    metrics_file = None
    if ddp.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(out_dir / "metrics.jsonl", "a" if cfg.resume else "w")

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    decisions_said = _say_backends(0, say)  # those made before the first step (see _decide_backends)
    tokens_per_step = cfg.batch_size * block_size * cfg.gradient_accumulation_steps * ddp.world_size
    draw_metrics = plot.Redrawer(out_dir, PLOT_SECONDS, say) if metrics_file is not None else lambda final: None

    def run_eval(final: bool = False) -> dict:
        nonlocal best_val, decisions_said
        # Rank 0's numbers on every rank: whether to save best.pt must be decided alike everywhere.
        result = from_rank0(ddp, evaluate(model, dataset, cfg, block_size, device, amp))
        if hellaswag is not None and (final or step % (cfg.hellaswag_interval or cfg.eval_interval) == 0):
            scored = evaluation.evaluate(raw_model, hellaswag, device, ddp, amp=amp)
            result = {**result, "hellaswag_acc": scored["acc"], "hellaswag_acc_norm": scored["acc_norm"]}
        log({"step": step, "tokens": step * tokens_per_step, **result, "train_seconds": train_seconds})
        draw_metrics(final)
        say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        decisions_said = _say_backends(decisions_said, say)
        if result["val_loss"] < best_val:
            best_val = result["val_loss"]
            save("best.pt")
        return result

    # Ctrl-C: finish the current step, save, stop. A second Ctrl-C interrupts at once.
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        if interrupted:
            raise KeyboardInterrupt
        interrupted = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    peak = perf.peak_flops(device, dtype)
    result: dict = {}
    try:
        if cfg.eval_only:
            return run_eval()
        model.train()
        interval_time, interval_steps = 0.0, 0  # training time only: evaluation is not counted
        stopping = False  # Ctrl-C on any rank: all stop after the same step, since saving is a collective
        while step < cfg.max_iters and not stopping:
            if step % cfg.eval_interval == 0:
                result = run_eval()
            t0 = time.perf_counter()
            factor = lr_factor(step, cfg)
            optimizer.set_lr_factor(factor)
            lr = cfg.learning_rate * factor  # AdamW's; Muon's is muon_lr * factor
            loss_sum = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                # Every process draws the same global batch and keeps its slice of it, so N
                # processes see exactly what one process with N times the batch would.
                x, y = dataset.get_batch("train", cfg.batch_size * ddp.world_size, block_size, batch_gen, device)
                x = x[ddp.rank * cfg.batch_size:(ddp.rank + 1) * cfg.batch_size]
                y = y[ddp.rank * cfg.batch_size:(ddp.rank + 1) * cfg.batch_size]
                sync = ddp.world_size == 1 or micro == cfg.gradient_accumulation_steps - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), amp:
                    _, loss = model(x, y)
                    loss = loss / cfg.gradient_accumulation_steps
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise TrainingError(f"the loss became {loss_sum} at step {step}: stopping; the last good "
                                    f"checkpoint ({out_dir / 'last.pt'}) is kept. Try a lower --learning_rate "
                                    "or --dtype float32.")
            if cfg.grad_clip > 0:
                optimizer.unscale_(scaler)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step(scaler)
            scaler.update()
            optimizer.zero_grad()
            step += 1
            elapsed = time.perf_counter() - t0
            interval_time += elapsed
            train_seconds += elapsed
            interval_steps += 1
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                tokens_per_s = tokens_per_step * interval_steps / interval_time
                interval_time, interval_steps = 0.0, 0
                mfu = flops_per_token * tokens_per_s / peak
                if ddp.master:
                    progress.update(step, loss_sum, lr, tokens_per_s, mfu, final=step == cfg.max_iters)
                log({"step": step, "tokens": step * tokens_per_step, "loss": loss_sum, "lr": lr,
                     "tokens_per_s": tokens_per_s, "mfu": mfu})
                decisions_said = _say_backends(decisions_said, say)
            if step % cfg.eval_interval == 0:
                save("last.pt")
            stopping = any_rank(ddp, interrupted, device)
        if stopping:
            say(f"interrupted at step {step}: saving {out_dir / 'last.pt'}")
            save("last.pt")
            return {**result, "interrupted": True}
        result = run_eval(final=True)
        save("last.pt")
        if cfg.sample_tokens and ddp.master:
            say("sample:\n" + complete(raw_model, dataset.tokenizer, "", cfg.sample_tokens, 0.8, 200, device))
        return result
    finally:
        if previous_handler is not None:  # None: the handler was not set from Python
            signal.signal(signal.SIGINT, previous_handler)
        if metrics_file is not None:
            metrics_file.close()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Every TrainConfig and GPTConfig field as ``--name`` (``--name_with_underscores`` works too)."""
    parser = argparse.ArgumentParser(description="Train a GPT (GPT-2 architecture) with fastgpt's kernels.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="model and optimisation defaults; options given explicitly override them")
    model = parser.add_argument_group("model (GPTConfig)")
    defaults = GPTConfig()
    for name in MODEL_FIELDS:
        default = SMALL.get(name, getattr(defaults, name))
        _add_option(model, name, type(getattr(defaults, name)), default)
    run = parser.add_argument_group("run (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        kind = {"int | None": int, "str | None": str}.get(f.type, {"int": int, "float": float, "str": str,
                                                                      "bool": bool}.get(f.type))
        _add_option(run, f.name, kind, f.default, help_extra="one of " + ", ".join(DATASET_NAMES) +
                    ", a text file's path, or a directory from python -m fastgpt.prepare"
                    if f.name == "dataset" else "")
    return parser


def _add_option(group, name: str, kind, default, help_extra: str = "") -> None:
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    if kind is bool:
        group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default: {default})")
    else:
        group.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS,
                           help=f"{help_extra} (default: {default})".strip())


def parse_args(argv=None) -> tuple[TrainConfig, dict, frozenset]:
    """``(TrainConfig, GPTConfig fields, names set explicitly)`` from the command line and preset."""
    args = vars(build_parser().parse_args(argv))
    preset = {**SMALL, **PRESETS[args.pop("preset")]}
    explicit = frozenset(args)
    values = {**preset, **args}
    model_defaults = dataclasses.asdict(GPTConfig())
    model_args = {k: values.get(k, model_defaults[k]) for k in MODEL_FIELDS}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    return cfg, model_args, explicit


def main(argv=None) -> int:
    """Entry point of ``python train.py``: returns the exit status."""
    try:
        result = train(*parse_args(argv))
    except (ValueError, FileNotFoundError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
