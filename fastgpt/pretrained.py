"""Hugging Face GPT-2 weights in and out: the one place that knows their layout.

A Hugging Face GPT-2 directory holds ``config.json`` (``model_type`` "gpt2" and GPT2Config's
fields), the weights in ``model.safetensors`` or ``pytorch_model.bin`` (or shards of either listed
in a ``.index.json``), and often the tokenizer's ``vocab.json`` and ``merges.txt``. Its tensor names
are fastgpt's, since both follow GPT-2's release, except that:

- the four projections (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are
  ``Conv1D`` layers, whose weights are stored (in, out): the transpose of ``nn.Linear``'s (out, in);
- GPT2LMHeadModel saves the names under ``transformer.``, OpenAI's own upload without it;
  ``lm_head.weight`` (tied to ``wte``) is usually left out; older files also hold every layer's
  causal mask (``attn.bias``, ``attn.masked_bias``), which fastgpt does not store.

fastgpt's model computes GPT-2's function when the config describes GPT-2: LayerNorm epsilon 1e-5,
the tanh GELU (``gelu_new`` or ``gelu_pytorch_tanh``), attention scaled by 1/sqrt(head size), no
cross attention, tied embeddings (:data:`GPT2_FUNCTION`), and an MLP 4 n_embd wide. Anything else
is refused with an error that names the field. Nothing is ever downloaded.

GPT2Config has three dropout rates (embeddings, attention, residual) where fastgpt has one; they
are training settings, not part of the function, so loading takes ``dropout`` as an argument
(default 0.0, as a new :class:`~fastgpt.model.GPTConfig`) and saving writes it to all three.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from fastgpt.checkpoint import atomic_writer
from fastgpt.data import GPT2Tokenizer
from fastgpt.config import LAYER_NORM_EPS, GPTConfig

DOWNLOAD_HINT = (
    "fastgpt reads Hugging Face models from a local directory and downloads nothing: download one "
    "first on a machine with internet, e.g. `hf download openai-community/gpt2 config.json "
    "model.safetensors vocab.json merges.txt --local-dir gpt2` (huggingface_hub's command line), or "
    "`python -c \"from transformers import GPT2LMHeadModel; "
    "GPT2LMHeadModel.from_pretrained('gpt2').save_pretrained('gpt2')\"`, then pass the directory"
)
"""What to do when a model name is not a local directory."""

# config.json's size fields and the GPTConfig fields they become.
SHAPE_FIELDS = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_embd": "n_embd",
                "n_layer": "n_layer", "n_head": "n_head"}
# The config.json fields that make the function GPT-2's: each one's GPT-2 value (also its default
# when absent, as in GPT2Config) first, then the other values meaning the same. The tanh GELU has two
# names in transformers; fastgpt's GELU is the tanh one.
GPT2_FUNCTION = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "layer_norm_epsilon": (LAYER_NORM_EPS,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}
# The Conv1D layers: their weights are stored transposed.
_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Causal-mask buffers of older files: constants, not weights.
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
# Weight files in the order transformers looks for them: one file, or an index of shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read(path: str | os.PathLike, model_class: type, dropout: float = 0.0) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The :class:`GPTConfig` and the fastgpt ``state_dict`` of a Hugging Face GPT-2 directory.

    Args:
        path: a local directory with ``config.json`` and the weights (see the module docstring).
        model_class: the model the state is for (:class:`fastgpt.model.GPT`): the names and shapes of
            its parameters are what the file's tensors must match.
        dropout: the model's dropout rate (default 0.0); the file's three rates are not read.

    Returns:
        ``(config, state_dict)``: ``vocab_size``, ``block_size`` (n_positions), ``n_layer``, ``n_head``
        and ``n_embd`` as in the file, ``bias=True``; every tensor under fastgpt's name and layout
        (``nn.Linear`` weights (out, in)), in the file's dtype, ``lm_head.weight`` the same tensor as
        ``transformer.wte.weight``.

    Raises:
        FileNotFoundError: ``path`` is not a directory (the message says how to download a model), or
            ``config.json`` or the weight files are missing.
        ValueError: the config is not GPT-2's architecture or function (the field is named), a
            weight file is unreadable or truncated, tensors are missing or unexpected, or a tensor's
            shape differs from what the config gives (the tensor is named).
    """
    directory = Path(path)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"{directory} {what}: {DOWNLOAD_HINT}")
    config = _read_config(directory, dropout)
    expected = _expected_shapes(model_class, config)
    tensors, source = _read_weights(directory)
    stored = {}  # fastgpt's name -> the file's name
    for name in tensors:
        ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if not _MASK_BUFFER.fullmatch(ours):
            stored[ours] = name
    unexpected = [stored[name] for name in stored if name not in expected]
    if unexpected:
        raise ValueError(f"{source} holds {_some(unexpected)}, for which config.json ({_describe(config)}) "
                         "has no place")
    missing = [name for name in expected if name not in stored and name != "lm_head.weight"]
    if missing:
        raise ValueError(f"{source} lacks {_some(missing)}, which config.json ({_describe(config)}) calls for")
    state = {}
    for name in expected:  # in the model's order, so that the first mismatch named is the first one met
        if name not in stored:
            continue
        tensor, conv1d = tensors[stored[name]], _CONV1D.fullmatch(name)
        want = expected[name][::-1] if conv1d else expected[name]
        if tuple(tensor.shape) != want:
            raise ValueError(f"{source}: {stored[name]} has shape {tuple(tensor.shape)}, but config.json "
                             f"({_describe(config)}) gives {want}")
        state[name] = tensor.t() if conv1d else tensor
    wte = state["transformer.wte.weight"]
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], wte):
        raise ValueError(f"{source}: lm_head.weight differs from transformer.wte.weight; fastgpt's output "
                         "projection is tied to the token embedding, as GPT-2's is")
    state["lm_head.weight"] = wte
    return config, state


def as_checkpoint(path: str | os.PathLike, model_class: type) -> dict:
    """A Hugging Face GPT-2 directory as the part of a fastgpt checkpoint that ``train.py --init_from``
    reads: ``{"model": state_dict, "model_config": GPTConfig fields, "tokenizer": its to_dict()}``.

    The tokenizer is :class:`~fastgpt.data.GPT2Tokenizer` of the directory (its ``vocab.json`` and
    ``merges.txt`` if present). Raises as :func:`read`.
    """
    config, state = read(path, model_class)
    return {"model": state, "model_config": dataclasses.asdict(config), "tokenizer": GPT2Tokenizer(path).to_dict()}


def save(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (a :class:`fastgpt.model.GPT`) to the directory ``path`` (created if needed) in the
    Hugging Face GPT-2 layout.

    ``config.json`` holds ``model_type`` "gpt2", GPT2LMHeadModel as the architecture and the
    GPT2Config fields; ``model.safetensors`` the weights in the model's dtype, Conv1D weights
    transposed, ``lm_head`` left out (tied). A model without biases (``bias=False``) is written
    with zero biases, which compute the same function. Each file is written atomically (the
    directory is not: an interrupted save can leave new weights beside an old config). Other files
    in the directory are left as they are. Returns the directory.

    ``transformers.GPT2LMHeadModel.from_pretrained(path)`` then computes the same outputs.
    """
    from safetensors.torch import save as safetensors_bytes

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        tensors[name] = (tensor.t() if _CONV1D.fullmatch(name) else tensor).contiguous()
        if not config.bias and name.endswith(".weight") and name.split(".")[-2] not in ("wte", "wpe"):
            tensors[name.removesuffix("weight") + "bias"] = tensor.new_zeros(tensor.shape[0])
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **{hf: getattr(config, ours) for hf, ours in SHAPE_FIELDS.items()},
        "n_inner": None,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        **{field: values[0] for field, values in GPT2_FUNCTION.items()},
    }
    with atomic_writer(directory / "model.safetensors") as f:
        f.write(safetensors_bytes(tensors, metadata={"format": "pt"}))
    with atomic_writer(directory / "config.json") as f:
        f.write((json.dumps(hf_config, indent=2) + "\n").encode("utf-8"))
    return directory


def _read_config(directory: Path, dropout: float) -> GPTConfig:
    """``config.json`` of ``directory`` as a GPTConfig, after checking that it describes GPT-2."""
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json, so it is not a Hugging Face model directory")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise ValueError(f"{file} holds a JSON {type(hf).__name__}, not an object")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{file} has model_type {hf.get('model_type')!r}: fastgpt reads GPT-2 models only "
                         "(model_type 'gpt2')")
    for field, accepted in GPT2_FUNCTION.items():
        value = hf.get(field, accepted[0])
        if value not in accepted or isinstance(value, bool) != isinstance(accepted[0], bool):
            raise ValueError(f"{file} has {field} {value!r}: fastgpt's GPT-2 has "
                             f"{' or '.join(repr(v) for v in accepted)}")
    missing = [field for field in SHAPE_FIELDS if field not in hf]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}")
    try:
        config = GPTConfig(**{ours: hf[field] for field, ours in SHAPE_FIELDS.items()}, dropout=dropout, bias=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: {exc}") from exc
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * config.n_embd:
        raise ValueError(f"{file} has n_inner {n_inner!r}: fastgpt's MLP is 4 * n_embd = {4 * config.n_embd} wide")
    return config


def _expected_shapes(model_class: type, config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The model's tensor names and shapes for ``config`` (taken from a model on the meta device,
    which allocates nothing)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}


def _some(names: list[str]) -> str:
    """The first few of ``names``, and how many more there are."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _describe(config: GPTConfig) -> str:
    return ", ".join(f"{hf}={getattr(config, ours)}" for hf, ours in SHAPE_FIELDS.items())


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of the directory's weights (the first of :data:`WEIGHT_FILES` present), and the
    file name to put in errors."""
    found = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{directory} has no weights: expected {' or '.join(WEIGHT_FILES)}")
    if not found.name.endswith(".index.json"):
        return _read_weight_file(found), str(found)
    try:
        weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{found} is not a shard index (a JSON object with a weight_map)") from exc
    tensors = {}
    for shard in shards:
        file = directory / shard
        if not file.is_file():
            raise FileNotFoundError(f"{found} lists {shard}, which is not in {directory}")
        tensors.update(_read_weight_file(file))
    return tensors, str(found)


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, else of a PyTorch file (read with ``weights_only``)."""
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # either reader fails in many ways on cut-off or foreign files
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{file} is not a readable weight file (truncated or another kind of file): "
                         f"{type(exc).__name__}: {first_line}") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file} does not hold a dict of tensors")
    return tensors
