"""``python -m fastgpt.eval hellaswag FILE MODEL``: HellaSwag accuracy, completion style.

FILE is HellaSwag's validation set as published (``hellaswag_val.jsonl``: one JSON object a line
with ``ctx``, four ``endings`` and the ``label`` of the right one), downloaded by the user. MODEL is
a checkpoint, a run directory or a Hugging Face GPT-2 directory. Each ending is tokenized with a
leading space after the context and scored by the model's cross-entropy over its own tokens, as
llm.c and build-nanogpt score it: ``acc`` picks the ending of least summed loss, ``acc_norm`` the
least loss per token. Prints both and writes them as JSON (``--out``). Under ``torchrun`` each
process scores its share of the examples and the counts are summed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import fastgpt_kernels
from fastgpt.device import autocast_context, resolve_dtype
from fastgpt.distributed import Distributed, setup_distributed
from fastgpt.sample import load_model

ENDINGS = 4


@dataclasses.dataclass(frozen=True)
class Example:
    """One HellaSwag item, tokenized: the context, each ending (with its leading space), the right one."""
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    label: int


def read_hellaswag(path: str | Path, tokenizer, vocab_size: int | None = None) -> list[Example]:
    """The examples of a HellaSwag JSONL file; a malformed line raises ValueError naming the file and
    line, and so does a token id outside a model's ``vocab_size`` (a tokenizer other than GPT-2's)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no HellaSwag file at {path}: download hellaswag_val.jsonl from the HellaSwag "
                                "repository (data/hellaswag_val.jsonl) and give its path")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ctx, endings, label = item["ctx"], item["endings"], item["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} line {number}: not a HellaSwag item with ctx, endings and label "
                                 f"({type(exc).__name__}: {exc})") from None
            if (not isinstance(endings, list) or len(endings) != ENDINGS or not isinstance(label, int)
                    or not 0 <= label < ENDINGS):
                raise ValueError(f"{path} line {number}: need {ENDINGS} endings and a label in [0, {ENDINGS}), "
                                 f"got {len(endings) if isinstance(endings, list) else endings!r} and {label!r}")
            examples.append(Example(tuple(tokenizer.encode(ctx)),
                                    tuple(tuple(tokenizer.encode(" " + ending)) for ending in endings), label))
            if vocab_size is not None and max(max(e) for e in examples[-1].endings) >= vocab_size:
                raise ValueError(f"{path} line {number} encodes to token ids outside the model's vocabulary of "
                                 f"{vocab_size}: HellaSwag needs the GPT-2 tokenizer")
    if not examples:
        raise ValueError(f"{path} holds no HellaSwag items")
    return examples


def _rows(examples: list[Example], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets) of every (example, ending): the context and the ending as one sequence,
    the targets -1 but for the ending's tokens; the context cut from the left to fit
    ``block_size`` + 1 tokens; rows padded at the end."""
    sequences = []
    for example in examples:
        for ending in example.endings:
            tokens = (example.context + ending)[-(block_size + 1):]
            scored = min(len(ending), len(tokens) - 1)  # the first token has no prediction
            sequences.append((tokens, scored))
    width = max(len(tokens) for tokens, _ in sequences) - 1
    idx = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, (tokens, scored) in enumerate(sequences):
        n = len(tokens) - 1
        idx[row, :n] = torch.tensor(tokens[:-1])
        targets[row, n - scored:n] = torch.tensor(tokens[n + 1 - scored:])
    return idx, targets


@torch.no_grad()
def ending_losses(model, examples: list[Example], device, amp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example and ending, the summed and the per-token cross-entropy of the ending: two
    (len(examples), 4) float tensors on the CPU."""
    idx, targets = _rows(examples, model.config.block_size)
    with amp or torch.autocast(device.type, enabled=False):
        losses = model.token_losses(idx.to(device), targets.to(device)).float().cpu()
    summed = losses.sum(dim=1).view(len(examples), ENDINGS)
    counts = (targets != -1).sum(dim=1).clamp(min=1).view(len(examples), ENDINGS)
    return summed, summed / counts


def evaluate(model, examples: list[Example], device, ddp: Distributed | None = None, batch_size: int = 8,
             amp=None, progress=None) -> dict:
    """acc and acc_norm over ``examples`` (this rank's share under ``ddp``; every rank must call it),
    ``batch_size`` examples (four rows each) a forward. ``progress(done, total, correct_norm)`` is
    called after each batch of this rank's."""
    ddp = ddp or Distributed()
    was_training = model.training
    model.eval()
    mine = examples[ddp.rank::ddp.world_size]
    correct = correct_norm = 0
    try:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            summed, mean = ending_losses(model, batch, device, amp)
            labels = torch.tensor([e.label for e in batch])
            correct += int((summed.argmin(dim=1) == labels).sum())
            correct_norm += int((mean.argmin(dim=1) == labels).sum())
            if progress is not None:
                progress(start + len(batch), len(mine), correct_norm)
    finally:
        model.train(was_training)
    counts = torch.tensor([correct, correct_norm, len(mine)], dtype=torch.float64, device=device)
    if ddp.world_size > 1:
        dist.all_reduce(counts)
    correct, correct_norm, total = (int(c) for c in counts.tolist())
    return {"acc": correct / total, "acc_norm": correct_norm / total, "examples": total}


def _hellaswag(args) -> int:
    ddp, device = setup_distributed(args.device)
    try:
        model, tokenizer = load_model(args.model, device)
        examples = read_hellaswag(args.file, tokenizer, model.config.vocab_size)
        dtype = resolve_dtype(args.dtype, device)
        started, shown = time.monotonic(), [0.0]

        def progress(done, total, correct_norm):
            if ddp.master and (time.monotonic() - shown[0] > 5 or done == total):
                shown[0] = time.monotonic()
                print(f"hellaswag: {done}/{total} examples on rank 0, acc_norm so far {correct_norm / done:.4f}, "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

        with fastgpt_kernels.use_backend(args.backend):
            result = evaluate(model, examples, device, ddp, args.batch_size, autocast_context(device, dtype),
                              progress)
        result = {**result, "model": str(args.model), "file": str(args.file)}
        if ddp.master:
            print(f"hellaswag: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} over "
                  f"{result['examples']} examples ({args.model})")
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt.eval", description=__doc__.splitlines()[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    hellaswag = tasks.add_parser("hellaswag", help="HellaSwag accuracy, completion style (llm.c's)")
    hellaswag.add_argument("file", help="HellaSwag's validation JSONL (ctx, endings, label), e.g. hellaswag_val.jsonl")
    hellaswag.add_argument("model", help="a checkpoint, a run directory or a Hugging Face GPT-2 directory")
    hellaswag.add_argument("--batch_size", type=int, default=8, help="examples (four rows each) a forward (default: 8)")
    hellaswag.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    hellaswag.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default: auto)")
    hellaswag.add_argument("--backend", default="auto", choices=fastgpt_kernels.BACKENDS,
                           help="kernels backend (default: auto)")
    hellaswag.add_argument("--out", default="hellaswag.json", help="the JSON result (default: hellaswag.json)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        return _hellaswag(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"python -m fastgpt.eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
