"""One interface for the training loop: :func:`load_dataset` and the datasets it returns."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ._common import _check_int
from .corpora import PreparedData, ShardedCorpus, open_corpus, prepare_default, prepare_text
from .tasks import AdditionTask, SortTask
from .tokenizers import CharTokenizer, Tokenizer, _given_kind

__all__ = ["TextDataset", "TaskDataset", "load_dataset", "DATASET_NAMES"]


class TextDataset:
    """A prepared text corpus (one file's cache or a sharded directory): random windows of any
    ``block_size`` from its train or val split."""

    is_task = False
    block_size = None  # any block size up to the split's length works

    def __init__(self, name: str, data: PreparedData | ShardedCorpus):
        self.name = name
        self.data = data

    @property
    def tokenizer(self) -> Tokenizer:
        """The corpus's tokenizer."""
        return self.data.tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size."""
        return self.data.vocab_size

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`get_batch` on split ``"train"`` or ``"val"``."""
        return self.data.get_batch(split, batch_size, block_size, generator, device)

    def __repr__(self):
        return (f"TextDataset({self.name!r}, tokenizer={self.tokenizer!r}, "
                f"train_tokens={self.data.num_tokens('train')}, val_tokens={self.data.num_tokens('val')})")


class TaskDataset:
    """A synthetic task behind the same interface as :class:`TextDataset`, plus :meth:`evaluate`.

    Sequences always have the task's own length (:attr:`block_size`); ``get_batch`` accepts any
    ``block_size`` at least that long (a model with a longer context handles them) and raises
    ValueError for a shorter one.
    """

    is_task = True

    def __init__(self, name: str, task: AdditionTask | SortTask):
        self.name = name
        self.task = task

    @property
    def tokenizer(self) -> CharTokenizer:
        """The task's character tokenizer."""
        return self.task.tokenizer

    @property
    def vocab_size(self) -> int:
        """The task's vocabulary size."""
        return self.task.vocab_size

    @property
    def block_size(self) -> int:
        """The length of every ``x`` and ``y`` the task produces."""
        return self.task.block_size

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The task's batch of training (``"train"``) or held-out (``"val"``) problems."""
        block_size = _check_int("block_size", block_size)
        if block_size < self.task.block_size:
            raise ValueError(f"the {self.name} task's sequences need block_size >= {self.task.block_size}, "
                             f"got block_size={block_size}")
        return self.task.get_batch(batch_size, generator, device, split=split)

    def evaluate(self, model, n: int = 500, generator: torch.Generator | None = None, device="cpu") -> float:
        """The task's exact-match accuracy on held-out problems (see :meth:`AdditionTask.evaluate`)."""
        return self.task.evaluate(model, n, generator, device)

    def __repr__(self):
        return f"TaskDataset({self.name!r}, {self.task!r})"


_TASKS = {"addition": AdditionTask, "sort": SortTask}
DATASET_NAMES = ("default", *_TASKS)
"""Names :func:`load_dataset` knows; anything else must be the path of a text file or of a prepared corpus."""


def load_dataset(name_or_path, tokenizer_kind: str = "char", cache_dir=None, val_fraction: float = 0.1,
                 tokenizer: Tokenizer | None = None, **task_options) -> TextDataset | TaskDataset:
    """The dataset called ``name_or_path``: ``"default"``, ``"addition"``, ``"sort"``, a text file's path,
    or a directory prepared by ``python -m fastgpt.prepare``.

    ``"default"`` is :func:`prepare_default` (the standard library's Python source); a file's path is
    :func:`prepare_text`; both tokenized with ``tokenizer_kind`` and cached under ``cache_dir``. A
    directory is :func:`open_corpus`: it brings its own tokenizer (``tokenizer_kind`` and
    ``cache_dir`` do not apply) and must hold validation tokens.
    The tasks take their options as keyword arguments (``digits=`` for addition, ``length=`` and
    ``alphabet=`` for sort) and have their own character vocabularies, so ``tokenizer_kind`` must be
    ``"char"`` for them. Names win over files of the same name in the current directory.
    ``tokenizer`` (a checkpoint's, when finetuning) is used instead of a new one; a task or a
    prepared directory accepts only its own.

    Raises:
        ValueError: the name is unknown and no such file exists (the message lists the names); a
            directory is not a finished corpus, has no validation tokens, or has another tokenizer
            than the given one.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or os.PathLike, got {type(name_or_path).__name__}")
    tokenizer_kind = _given_kind(tokenizer, tokenizer_kind)
    name = name_or_path if isinstance(name_or_path, str) else None
    if name in _TASKS:
        if tokenizer_kind != "char":
            raise ValueError(f"the {name} task has its own character vocabulary; tokenizer_kind must be "
                             f"'char', got {tokenizer_kind!r}")
        dataset = TaskDataset(name, _TASKS[name](**task_options))
        if tokenizer is not None and tokenizer != dataset.tokenizer:
            raise ValueError(f"the {name} task has its own vocabulary {dataset.tokenizer.chars!r}, which differs "
                             f"from the given tokenizer's")
        return dataset
    if task_options:
        raise TypeError(f"options {sorted(task_options)} apply only to the tasks {sorted(_TASKS)}, "
                        f"not to {name_or_path!r}")
    if name == "default":
        return TextDataset("default", prepare_default(cache_dir, tokenizer_kind, val_fraction, tokenizer=tokenizer))
    path = Path(name_or_path)
    if path.is_dir():
        return TextDataset(path.resolve().name, _open_corpus_for_training(path, tokenizer))
    if path.exists():
        return TextDataset(path.name, prepare_text(path, tokenizer_kind, cache_dir, val_fraction, tokenizer))
    raise ValueError(f"unknown dataset {str(name_or_path)!r}: expected one of {list(DATASET_NAMES)} "
                     "or the path of an existing UTF-8 text file or of a directory prepared by python -m "
                     "fastgpt.prepare")


def _open_corpus_for_training(directory: Path, tokenizer: Tokenizer | None) -> ShardedCorpus:
    """:func:`open_corpus`, checked against a given tokenizer and for a validation split to evaluate on."""
    corpus = open_corpus(directory)
    if tokenizer is not None and tokenizer != corpus.tokenizer:
        raise ValueError(f"{directory} was prepared with {corpus.tokenizer!r}, not the given tokenizer {tokenizer!r} "
                         "(a checkpoint's token ids only mean the same with the same tokenizer)")
    if corpus.num_tokens("val") == 0:
        meta = corpus.meta
        raise ValueError(f"{directory} has no validation tokens: none of its {meta['splits']['train']['documents']} "
                         f"documents fell into the val split (val_fraction {meta['val_fraction']}); prepare it "
                         "again with a larger --val_fraction")
    return corpus
