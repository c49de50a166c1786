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
from fastgpt_kernels._lazy import lazy_attributes

# Each public name's module; it is imported on first use, so preparing a corpus (.streaming) imports no torch.
_HOMES = {
    **dict.fromkeys(["CharTokenizer", "GPT2Tokenizer", "Tokenizer", "tokenizer_from_dict", "gpt2_encoding",
                     "gpt2_encoding_from"], ".tokenizers"),
    **dict.fromkeys(["PreparedData", "ShardedCorpus", "prepare_text", "prepare_default", "default_corpus_text",
                     "open_corpus", "get_batch", "DEFAULT_CACHE_DIR"], ".corpora"),
    "TOKEN_DTYPE": "._common",
    **dict.fromkeys(["TextDataset", "TaskDataset", "load_dataset", "DATASET_NAMES"], ".dataset"),
    **dict.fromkeys(["AdditionTask", "SortTask"], ".tasks"),
    "prepare_corpus": ".streaming",
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)
