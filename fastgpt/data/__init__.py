"""Training data: tokenizers, token files prepared once, random batches and synthetic tasks.

One module per concern; every public name is importable from ``fastgpt.data``:

- :mod:`.tokenizers`: :class:`CharTokenizer` (one token per character) and :class:`GPT2Tokenizer`
  (GPT-2's byte-level BPE through tiktoken, built offline), restored by :func:`tokenizer_from_dict`.
- :mod:`.corpora`: :func:`prepare_text` and :func:`prepare_default` tokenize a corpus once into
  uint16 token files under a cache directory; :func:`get_batch` draws random windows from them.
- :mod:`.tasks`: the synthetic :class:`AdditionTask` and :class:`SortTask`, scored on their answers.
- :mod:`.dataset`: :func:`load_dataset` puts all of these behind one interface for the training loop.
"""
from .corpora import DEFAULT_CACHE_DIR, PreparedData, default_corpus_text, get_batch, prepare_default, prepare_text
from .dataset import DATASET_NAMES, TaskDataset, TextDataset, load_dataset
from .tasks import AdditionTask, SortTask
from .tokenizers import CharTokenizer, GPT2Tokenizer, Tokenizer, gpt2_encoding, tokenizer_from_dict

__all__ = [
    "CharTokenizer", "GPT2Tokenizer", "Tokenizer", "tokenizer_from_dict", "gpt2_encoding",
    "PreparedData", "prepare_text", "prepare_default", "default_corpus_text", "get_batch",
    "AdditionTask", "SortTask", "TextDataset", "TaskDataset", "load_dataset",
    "DEFAULT_CACHE_DIR", "DATASET_NAMES",
]
