"""``python -m fastgpt.sample``: text from a checkpoint or a Hugging Face GPT-2 directory.

Give a prompt (``--prompt``, ``--prompt_file``, or none to start from the first token), and get
``--num_samples`` continuations of ``--max_new_tokens`` tokens. ``--interactive`` reads prompts from
the terminal, one per line, and prints a completion for each until end of input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fastgpt_kernels
from fastgpt import checkpoint, pretrained
from fastgpt.data import GPT2Tokenizer, tokenizer_from_dict
from fastgpt.model import GPT, GPTConfig
from fastgpt.device import resolve_device


def load_model(path: str | Path, device: torch.device):
    """``(model, tokenizer)`` from a checkpoint file, a run directory (its ``best.pt``, else
    ``last.pt``), or a Hugging Face GPT-2 directory (one with ``config.json``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or model directory at {path}. {pretrained.DOWNLOAD_HINT}")
    if (path / "config.json").is_file():
        return GPT.from_pretrained(path).to(device).eval(), GPT2Tokenizer(path)
    if path.is_dir():
        candidates = [path / "best.pt", path / "last.pt"]
        path = next((p for p in candidates if p.is_file()), candidates[-1])
    state = checkpoint.load(path)
    model = GPT(GPTConfig(**{**state["model_config"], "dropout": 0.0}))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, tokenizer_from_dict(state["tokenizer"])


def complete(model: GPT, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             device) -> str:
    """The prompt's continuation (the generated text only). An empty prompt starts from token 0.
    The model samples in eval mode (no dropout) and is left in the mode it was in."""
    ids = tokenizer.encode(prompt) if prompt else [0]
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"the prompt encodes to token id {max(ids)}, outside the model's vocabulary of "
                         f"{model.config.vocab_size}")
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, len(ids):].tolist())


def _sample(args) -> None:
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.checkpoint, device)
    if args.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {args.num_samples}")
    torch.manual_seed(args.seed)

    def run(text: str) -> str:
        return complete(model, tokenizer, text, args.max_new_tokens, args.temperature, args.top_k, device)

    if args.interactive:
        for line in sys.stdin:
            print(run(line.rstrip("\n")), flush=True)
        return
    text = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    for i in range(args.num_samples):
        if i:
            print("-" * 40)
        print(text + run(text), flush=True)


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastgpt.sample", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("checkpoint", nargs="?", default="out",
                        help="a checkpoint file, a run directory, or a Hugging Face GPT-2 directory")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue")
    prompt.add_argument("--prompt_file", "--prompt-file", help="read the prompt from this UTF-8 file")
    prompt.add_argument("--interactive", action="store_true", help="read prompts from standard input, one per line")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=500)
    parser.add_argument("--num_samples", "--num-samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", "--top-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", choices=fastgpt_kernels.BACKENDS, help="kernels backend")
    args = parser.parse_args(argv)
    try:
        with fastgpt_kernels.use_backend(args.backend):
            _sample(args)
    except (ValueError, TypeError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
