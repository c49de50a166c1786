"""What the corpora, their preparation and the synthetic tasks share: the layout of token files and argument checks.

No torch here: corpus preparation (:mod:`.streaming`) imports only torch-free modules.
"""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tokenizers import Tokenizer

TOKEN_DTYPE = np.dtype("<u2")
"""The dtype of every token file: little-endian uint16."""
_UINT16_MAX = int(np.iinfo(TOKEN_DTYPE).max)

# A sharded corpus's meta.json names its format and version; readers refuse any other.
CORPUS_FORMAT = "fastgpt-corpus"
CORPUS_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split`` in a sharded corpus, e.g. ``train_000003.bin``."""
    return f"{split}_{index:06d}.bin"


SHARD_GLOB = "{split}_" + "[0-9]" * 6 + ".bin"  # every name shard_name gives, for glob after .format(split=...)


def check_uint16_vocab(tokenizer: Tokenizer, source: str) -> None:
    """Raise ValueError when ``tokenizer`` has ids that the uint16 token files cannot hold."""
    if tokenizer.vocab_size - 1 > _UINT16_MAX:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token files "
                         f"(ids up to {_UINT16_MAX}); {source} has too many distinct tokens")


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_val_fraction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"val_fraction must be a real number, got {type(value).__name__}")
    if not 0 <= value < 1:  # NaN fails both comparisons
        raise ValueError(f"val_fraction must be in [0, 1), got {value}")
    return float(value)
