"""Which launch configuration each autotuned Triton kernel runs with: the one place that decides.

Every autotuned kernel of the ops is registered here (:func:`autotuned`) under a name such as
``"attention.fwd"`` or ``"gelu_mlp.dweight"``, with its candidate configs. For each launch the
config is, in this order:

1. the config pinned for that kernel (:func:`use_configs`), when one is: tests run every config
   this way (Triton's interpreter cannot autotune), and benchmarks compare configs;
2. in Triton's interpreter, which cannot time anything, the allowed config with the largest tiles
   (the fewest programs: the interpreter runs them one after another);
3. on a GPU, Triton's autotuner's choice among the configs the op allows for these inputs.

An op may allow only some of a kernel's configs for given inputs (say, tiles that do not fit a wide
head dimension); a pinned config outside them is refused with a ValueError, never launched.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

from . import _dispatch


@dataclasses.dataclass(frozen=True)
class Tunable:
    """An autotuned kernel: its name, its candidate configs and Triton's autotuner over them."""

    name: str
    tuner: object  # triton.runtime.autotuner.Autotuner
    configs: tuple

    @property
    def fn(self):
        """The @triton.jit function the autotuner launches."""
        return self.tuner.fn


_REGISTRY: dict[str, Tunable] = {}
_pins: dict = {}  # kernel name -> triton.Config


def autotuned(name: str, kernel, configs, key: list[str], prune: Callable | None = None) -> Tunable:
    """Register ``kernel`` (a @triton.jit function) as the autotuned kernel ``name``.

    ``prune(configs, named_args)`` returns the configs allowed for a launch's arguments (all of
    them when None); the autotuner times only those.
    """
    import triton  # not at module level: kernels imports this module with or without Triton

    assert name not in _REGISTRY, f"{name} is registered twice"
    prune_by = None
    if prune is not None:
        prune_by = {"early_config_prune": lambda candidates, named_args, **kwargs:
                    prune(candidates, {**named_args, **kwargs})}
    tuner = triton.autotune(configs=list(configs), key=key, prune_configs_by=prune_by)(kernel)
    _REGISTRY[name] = Tunable(name, tuner, tuple(configs))
    return _REGISTRY[name]


def kernels() -> dict[str, tuple]:
    """Every autotuned kernel's name and its candidate configs (for tests and reports)."""
    return {name: tunable.configs for name, tunable in _REGISTRY.items()}


@contextlib.contextmanager
def use_configs(pins: dict):
    """Run the block with ``pins`` (kernel name -> ``triton.Config``, one of that kernel's configs).

    Pinned kernels launch with their pinned config, without autotuning; the others as usual. Names
    and configs are checked here; a pinned config that the op does not allow for some inputs
    raises ValueError when such a launch comes.
    """
    for name, config in pins.items():
        if name not in _REGISTRY:
            raise ValueError(f"unknown kernel {name!r}; autotuned kernels: {', '.join(sorted(_REGISTRY))}")
        if config not in _REGISTRY[name].configs:
            raise ValueError(f"{config} is not one of {name}'s configs: {list(_REGISTRY[name].configs)}")
    previous = dict(_pins)
    _pins.update(pins)
    try:
        yield
    finally:
        _pins.clear()
        _pins.update(previous)


def describe(config) -> str:
    """``"128x64 warps=8 stages=2"``: a ``triton.Config``'s BLOCK_* sizes in order, then its launch options."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}"


def tile_size(config) -> int:
    """The product of a config's BLOCK_* sizes: how much work one program does."""
    size = 1
    for name, value in config.kwargs.items():
        if name.startswith("BLOCK_"):
            size *= value
    return size


def _autotuner_can_time() -> bool:
    """Triton's autotuner times configs on a GPU; its interpreter cannot time anything."""
    return not _dispatch.INTERPRETED


def launch(tunable: Tunable, grid_of: Callable, args: tuple, meta: dict, allowed=None) -> tuple:
    """``(kernel, grid, args, meta)``: one launch of ``tunable`` with the config chosen as the module says.

    ``grid_of(block_sizes)`` gives the grid for a config's kwargs; ``allowed`` lists the configs
    the op allows for these inputs (default: all of them).
    """
    allowed = tunable.configs if allowed is None else allowed
    config = _pins.get(tunable.name)
    if config is not None and config not in allowed:
        raise ValueError(f"the config pinned for {tunable.name}, {config}, does not fit these inputs; "
                         f"allowed: {list(allowed)}")
    if config is None and not _autotuner_can_time():
        config = max(allowed, key=tile_size)
    if config is None:
        return tunable.tuner, grid_of, args, meta
    return tunable.fn, grid_of(config.kwargs), args, {**meta, **config.all_kwargs()}
