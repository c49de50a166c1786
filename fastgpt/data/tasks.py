"""Synthetic tasks: problems generated on the fly, scored on their answers only.

:class:`AdditionTask` and :class:`SortTask` generate problems on the fly, score only the answer
tokens and keep a deterministic held-out set for :meth:`evaluate`.
"""
from __future__ import annotations

import torch

from ._common import _check_int
from .corpora import _check_generator, _to_device
from .tokenizers import CharTokenizer

__all__ = ["AdditionTask", "SortTask"]


_HELD_OUT_BUCKETS = 10
# Up to this many problems, a task lists its training and held-out problems once; beyond it,
# problems are drawn at random and sorted to their side of the split as they come.
_ENUMERATE_LIMIT = 1 << 20


def _held_out_mask(keys: torch.Tensor) -> torch.Tensor:
    """True for the problem keys (int64) that belong to the held-out tenth.

    A multiplicative hash of the key decides, rather than ``key % 10``: a plain residue would hold out
    a pattern of digits (for example every problem whose last digit is 0) that training never sees at
    all. The key is folded to 32 bits and multiplied by a constant below 2**31, so the product stays
    within int64.
    """
    folded = (keys ^ (keys >> 32)) & 0xFFFFFFFF
    mixed = (folded * 0x5BD1E995) & 0xFFFFFFFF
    return (mixed >> 16) % _HELD_OUT_BUCKETS == 0


class _SyntheticTask:
    """Problems are integer keys in ``[0, n_problems)``; subclasses turn keys into token sequences.

    Every sequence is ``prompt_len`` prompt tokens followed by ``answer_len`` answer tokens; only the
    answer is scored. Problems whose key hashes into the held-out bucket never appear in training
    batches: they are the ``"val"`` split and what :meth:`evaluate` measures.
    """

    tokenizer: CharTokenizer
    prompt_len: int
    answer_len: int

    def _init_split(self, n_problems: int) -> None:
        self.n_problems = n_problems
        self._pools = None
        if n_problems <= _ENUMERATE_LIMIT:
            keys = torch.arange(n_problems)
            held = _held_out_mask(keys)
            self._pools = {False: keys[~held], True: keys[held]}
            if not len(self._pools[False]) or not len(self._pools[True]):
                raise ValueError(f"{type(self).__name__} with {n_problems} problems is too small to split into "
                                 "training and held-out problems; make it larger")

    @property
    def vocab_size(self) -> int:
        """Size of the task's character vocabulary."""
        return self.tokenizer.vocab_size

    @property
    def block_size(self) -> int:
        """Length of ``x`` and ``y`` in a batch: one less than a whole sequence."""
        return self.prompt_len + self.answer_len - 1

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sample_keys(self, n: int, held_out: bool, generator: torch.Generator) -> torch.Tensor:
        if self._pools is not None:
            pool = self._pools[held_out]
            return pool[torch.randint(len(pool), (n,), generator=generator)]
        chunks, have = [], 0
        # Each draw keeps about a tenth (held out) or nine tenths (training) of the candidates.
        for _ in range(1000):
            candidates = torch.randint(self.n_problems, (max(64, 12 * (n - have)),), generator=generator)
            kept = candidates[_held_out_mask(candidates) == held_out]
            chunks.append(kept)
            have += len(kept)
            if have >= n:
                return torch.cat(chunks)[:n]
        raise RuntimeError(f"could not draw {n} {'held-out' if held_out else 'training'} problems")

    def get_batch(self, batch_size: int, generator: torch.Generator, device="cpu",
                  split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of random problems: ``x`` (B, block_size) and targets ``y`` shifted by one.

        ``y`` is -1 on the positions whose next token is still part of the prompt, so the loss
        scores the answer only. ``split="train"`` (default) draws training problems, ``"val"``
        held-out ones. Both int64, on ``device``.
        """
        batch_size = _check_int("batch_size", batch_size)
        _check_generator(generator)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        seq = self._sequences(self._sample_keys(batch_size, split == "val", generator))
        x = seq[:, :-1].contiguous()
        y = seq[:, 1:].clone()
        y[:, : self.prompt_len - 1] = -1
        return _to_device(x, device), _to_device(y, device)

    @torch.no_grad()
    def evaluate(self, model, n: int = 500, generator: torch.Generator | None = None, device="cpu",
                 batch_size: int = 250) -> float:
        """Exact-match accuracy of greedy answers to ``n`` random held-out problems, in [0, 1].

        Calls ``model.generate(prompts, answer_len, top_k=1)`` on batches of at most ``batch_size``
        prompts; an answer counts only if every token is right. A ``torch.nn.Module`` is put in eval
        mode for the call and restored afterwards. ``generator`` picks the problems; None (default)
        means a fixed seed, so repeated calls measure the same problems.
        """
        n = _check_int("n", n)
        batch_size = _check_int("batch_size", batch_size)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        _check_generator(generator)
        seq = self._sequences(self._sample_keys(n, True, generator))
        prompts, answers = seq[:, : self.prompt_len], seq[:, self.prompt_len:]
        was_training = model.training if isinstance(model, torch.nn.Module) else None
        if was_training:
            model.eval()
        try:
            correct = 0
            for start in range(0, n, batch_size):
                out = model.generate(prompts[start:start + batch_size].to(device), self.answer_len, top_k=1)
                got = out[:, self.prompt_len:self.prompt_len + self.answer_len].cpu()
                if got.shape != answers[start:start + batch_size].shape:
                    raise ValueError(f"model.generate returned shape {tuple(out.shape)}; expected "
                                     f"{self.answer_len} new tokens after each prompt of {self.prompt_len}")
                correct += int((got == answers[start:start + batch_size]).all(dim=1).sum())
        finally:
            if was_training:
                model.train()
        return correct / n


def _digits(values: torch.Tensor, width: int, base: int = 10) -> torch.Tensor:
    """(N,) non-negative ints -> (N, width) digits in ``base``, most significant first, zero-padded."""
    powers = base ** torch.arange(width - 1, -1, -1)
    return (values[:, None] // powers) % base


class AdditionTask(_SyntheticTask):
    """``a+b=`` then the digits of ``c = a + b`` least significant first.

    ``a`` and ``b`` are zero-padded to ``digits`` digits and the answer to ``digits + 1``, so every
    problem has the same length and needs no end marker: ``07+45=`` is answered ``250`` (52
    reversed). Reversed answers let the model produce the digit it can compute next, carry included.
    About a tenth of the (a, b) pairs, chosen by :meth:`is_held_out`, is never trained on.
    """

    def __init__(self, digits: int = 2):
        self.digits = _check_int("digits", digits)
        if self.digits > 9:
            raise ValueError(f"digits must be at most 9, got {digits}")
        self.tokenizer = CharTokenizer("0123456789+=")
        self.prompt_len = 2 * self.digits + 2
        self.answer_len = self.digits + 1
        self._digit_ids = torch.tensor(self.tokenizer.encode("0123456789"))
        self._plus, self._equals = self.tokenizer.encode("+=")
        self._init_split(10 ** (2 * self.digits))

    def is_held_out(self, a: int, b: int) -> bool:
        """Whether the problem ``a + b`` belongs to the held-out set."""
        limit = 10 ** self.digits
        for name, value in (("a", a), ("b", b)):
            _check_int(name, value, minimum=0)
            if value >= limit:
                raise ValueError(f"{name} must have at most {self.digits} digits, got {value}")
        return bool(_held_out_mask(torch.tensor([a * limit + b]))[0])

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        a, b = keys // 10 ** self.digits, keys % 10 ** self.digits
        column = torch.ones(len(keys), 1, dtype=torch.long)
        parts = [
            self._digit_ids[_digits(a, self.digits)], column * self._plus,
            self._digit_ids[_digits(b, self.digits)], column * self._equals,
            self._digit_ids[_digits(a + b, self.answer_len).flip(1)],
        ]
        return torch.cat(parts, dim=1)

    def __repr__(self):
        return f"AdditionTask(digits={self.digits})"


class SortTask(_SyntheticTask):
    """``length`` symbols from ``alphabet``, the separator ``|``, then the same symbols sorted.

    Sorting is by character (code point), e.g. ``CABBAC|AABBCC``. About a tenth of the
    ``len(alphabet) ** length`` sequences, chosen by :meth:`is_held_out`, is never trained on.
    """

    SEPARATOR = "|"

    def __init__(self, length: int = 6, alphabet: str = "ABC"):
        self.length = _check_int("length", length)
        if not isinstance(alphabet, str):
            raise TypeError(f"alphabet must be a str, got {type(alphabet).__name__}")
        if len(alphabet) < 2 or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must have at least 2 distinct characters and no repeats, got {alphabet!r}")
        if self.SEPARATOR in alphabet:
            raise ValueError(f"alphabet must not contain the separator {self.SEPARATOR!r}, got {alphabet!r}")
        n_problems = len(alphabet) ** self.length
        if n_problems >= 2 ** 62:
            raise ValueError(f"len(alphabet) ** length = {n_problems} is too large; use a shorter length")
        self.alphabet = alphabet
        self.tokenizer = CharTokenizer(alphabet + self.SEPARATOR)
        self.prompt_len = self.length + 1
        self.answer_len = self.length
        self._symbol_ids = torch.tensor(self.tokenizer.encode(alphabet))
        (self._separator,) = self.tokenizer.encode(self.SEPARATOR)
        self._init_split(n_problems)

    def is_held_out(self, sequence: str) -> bool:
        """Whether the unsorted ``sequence`` (``length`` symbols of the alphabet) is held out."""
        if not isinstance(sequence, str):
            raise TypeError(f"sequence must be a str, got {type(sequence).__name__}")
        if len(sequence) != self.length or any(c not in self.alphabet for c in sequence):
            raise ValueError(f"sequence must be {self.length} characters of {self.alphabet!r}, got {sequence!r}")
        key = 0
        for c in sequence:
            key = key * len(self.alphabet) + self.alphabet.index(c)
        return bool(_held_out_mask(torch.tensor([key]))[0])

    def _sequences(self, keys: torch.Tensor) -> torch.Tensor:
        symbols = self._symbol_ids[_digits(keys, self.length, base=len(self.alphabet))]  # (N, length)
        separator = torch.full((len(keys), 1), self._separator, dtype=torch.long)
        # Ids follow character order, so sorting ids sorts the characters.
        return torch.cat([symbols, separator, symbols.sort(dim=1).values], dim=1)

    def __repr__(self):
        return f"SortTask(length={self.length}, alphabet={self.alphabet!r})"

