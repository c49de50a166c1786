"""Generation speed with the KV cache against without it (a part of ``python -m bench``).

``GPT.generate`` with ``use_cache=True`` runs the model once over the prompt and then over one new
position per token; without the cache every step runs it over the whole context again. Both
generate greedily (``top_k=1``), so they must return the same tokens, which is checked, and are
timed round by round in turn (:func:`bench.measure.interleaved_times`).

Models (random weights: speed does not depend on them), in float32 on a CPU and bfloat16
autocast on a GPU:

``gpt2-124m``  GPT-2 124M (``GPTConfig``'s defaults), 256 new tokens after a 256-token prompt.
``lecture``    the lecture's shape (6 layers, 6 heads, 384 wide, 65 symbols, context 256), 128 new
               tokens after a 128-token prompt: its whole context. Past it every step must run
               over the whole window again, cache or not (see ``GPT.generate``).
"""
from __future__ import annotations

import contextlib

import torch

from bench import measure
from fastgpt.model import GPT, GPTConfig

# (name, GPTConfig fields, prompt tokens, new tokens) per size.
MODELS = {
    "tiny": [("tiny", dict(n_layer=2, n_head=2, n_embd=32, vocab_size=65, block_size=64), 16, 16)],
    "full": [("lecture", dict(n_layer=6, n_head=6, n_embd=384, vocab_size=65, block_size=256), 128, 128),
             ("gpt2-124m", {}, 256, 256)],
}
MODELS["quick"] = MODELS["full"]
ROUNDS = {"tiny": 1, "quick": 1, "full": 3}  # a GPT-2 run without the cache takes minutes on a CPU
TARGET = ("gpt2-124m", 5.0)  # the cache at least this many times faster


def run(size: str, device: torch.device, log=print) -> list[dict]:
    """Per model: tokens/s with and without the cache (median of rounds) and the paired speed-up."""
    rows = []
    for name, fields, prompt_len, new in MODELS[size]:
        torch.manual_seed(0)
        config = GPTConfig(**fields, dropout=0.0)
        model = GPT(config).to(device).eval()
        prompt = torch.randint(config.vocab_size, (1, prompt_len), device=device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())
        outputs = {}

        def generate(use_cache):
            def call():
                with torch.no_grad(), autocast:
                    outputs[use_cache] = model.generate(prompt, new, top_k=1, use_cache=use_cache)
            return call

        log(f"generation: {name}, {new} tokens after {prompt_len}, cache and no cache ...")
        times = measure.interleaved_times({"cache": generate(True), "no cache": generate(False)}, device,
                                          ROUNDS[size], warmup=0)
        if not torch.equal(outputs[True], outputs[False]):
            raise RuntimeError(f"{name}: greedy generation with the cache differs from generation without it")
        paired = [slow / fast for fast, slow in zip(times["cache"], times["no cache"])]
        rows.append({"model": name, "prompt": prompt_len, "new_tokens": new,
                     "precision": "bfloat16" if device.type == "cuda" else "float32",
                     "cache_tokens_per_s": new / measure.median(times["cache"]),
                     "no_cache_tokens_per_s": new / measure.median(times["no cache"]),
                     "speedup": measure.median(paired), "speedup_min": min(paired), "speedup_max": max(paired),
                     "rounds": len(paired)})
    return rows


def table(rows: list[dict]) -> list[str]:
    """The figures as text, with the target's line where its model was measured."""
    lines = [f"{'model':<10} {'prompt':>6} {'new':>4} {'precision':<9} {'cache tok/s':>11} {'no cache tok/s':>14} "
             f"{'speed-up':>8} {'(rounds)':>13}"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['prompt']:>6} {r['new_tokens']:>4} {r['precision']:<9} "
                     f"{r['cache_tokens_per_s']:>11.1f} {r['no_cache_tokens_per_s']:>14.1f} {r['speedup']:>7.2f}x "
                     f"{r['speedup_min']:>5.2f}-{r['speedup_max']:.2f}x")
    for r in rows:
        if r["model"] == TARGET[0]:
            met = r["speedup"] >= TARGET[1]
            lines.append(f"target: generation with the cache >= {TARGET[1]:.0f}x without it at {TARGET[0]}: "
                         f"{r['speedup']:.2f}x, {'met' if met else 'MISSED'}")
    return lines
