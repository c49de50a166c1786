"""Training data: tokenizers, token files prepared once, random batches and synthetic tasks.

One module per concern; every public name is importable from ``fastgpt.data``:

- :mod:`.tokenizers`: :class:`CharTokenizer` (one token per character) and :class:`GPT2Tokenizer`
  (GPT-2's byte-level BPE through tiktoken, built offline), restored by :func:`tokenizer_from_dict`.
- :mod:`.corpora`: uint16 token files read through memory maps, and random batches from them
  (:func:`get_batch`): one text file tokenized once into a cache (:func:`prepare_text`,
  :func:`prepare_default`), or a sharded corpus directory (:func:`open_corpus`).
- :mod:`.streaming`: :func:`prepare_corpus` (``python -m fastgpt.prepare``) streams corpora too big
  for memory from many files into such a directory, tokenized by worker processes.
- :mod:`.tasks`: the synthetic :class:`AdditionTask` and :class:`SortTask`, scored on their answers.
- :mod:`.dataset`: :func:`load_dataset` puts all of these behind one interface for the training loop.
"""
from .corpora import (DEFAULT_CACHE_DIR, TOKEN_DTYPE, PreparedData, ShardedCorpus, default_corpus_text, get_batch,
                      open_corpus, prepare_default, prepare_text)
from .dataset import DATASET_NAMES, TaskDataset, TextDataset, load_dataset
from .streaming import prepare_corpus
from .tasks import AdditionTask, SortTask
from .tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_encoding, gpt2_encoding_from, tokenizer_from_dict

__all__ = [
    "CharTokenizer", "GPT2Tokenizer", "Tokenizer", "tokenizer_from_dict", "gpt2_encoding", "gpt2_encoding_from",
    "PreparedData", "ShardedCorpus", "prepare_text", "prepare_default", "default_corpus_text", "open_corpus",
    "prepare_corpus", "get_batch", "AdditionTask", "SortTask", "TextDataset", "TaskDataset", "load_dataset",
    "DEFAULT_CACHE_DIR", "DATASET_NAMES", "TOKEN_DTYPE",
]
