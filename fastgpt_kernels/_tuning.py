"""Which launch configuration each autotuned Triton kernel runs with: the one place that decides.

Every autotuned kernel of the ops is registered here (:func:`autotuned`) under a name such as
``"attention.fwd"`` or ``"gelu_mlp.dweight"``, with its candidate configs. For each launch the
config is, in this order:

1. the config pinned for that kernel (:func:`use_configs`), when one is: tests run every config
   this way (Triton's interpreter cannot autotune), and benchmarks compare configs;
2. for a launch over at most ``SMALL_TOKENS`` tokens (a generation step, a tiny batch), the allowed
   config with the smallest tiles, untimed: such launches are latency-bound, and timing the
   candidates would cost more than a good choice could save;
3. in Triton's interpreter, which cannot time anything, the allowed config with the largest tiles
   (the fewest programs: the interpreter runs them one after another);
4. on a GPU, Triton's autotuner's choice among the configs the op allows for these inputs, timed
   once per launch key: the ops key on the token count rounded up to a power of two, so a training
   run tunes once per shape class. Later launches of the key go straight to the kernel. Choices
   are kept on disk (:func:`cache_file`) per triton version and GPU, and a later process starts
   from them instead of timing again.

:func:`tuned_configs` lists the choices made (or read from disk) in this process; pin one with
:func:`use_configs`. An op may allow only some of a kernel's configs for given inputs (say, tiles
that do not fit a wide head dimension); a pinned config outside them is refused with a
ValueError, never launched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from pathlib import Path
from typing import Callable

from . import _io

SMALL_TOKENS = 64  # launches over this many tokens or fewer take the smallest tiles, untimed


@dataclasses.dataclass
class Tunable:
    """An autotuned kernel: its name, its candidate configs, Triton's autotuner over them, and the
    choices made so far (by this process's autotuner, or read from disk), by launch key."""

    name: str
    tuner: object  # triton.runtime.autotuner.Autotuner
    configs: tuple
    restore: tuple = ()  # arguments the kernel adds into: timing runs it many times
    chosen: dict = dataclasses.field(default_factory=dict)  # launch key -> triton.Config
    loaded: bool = False  # whether the disk cache's choices were read

    @property
    def fn(self):
        """The @triton.jit function the autotuner launches."""
        return self.tuner.fn


_REGISTRY: dict[str, Tunable] = {}
_pins: dict = {}  # kernel name -> triton.Config


def autotuned(name: str, kernel, configs, key: list[str], prune: Callable | None = None,
              restore: tuple[str, ...] = ()) -> Tunable:
    """Register ``kernel`` (a @triton.jit function) as the autotuned kernel ``name``.

    ``key`` names the arguments whose values key a tuning (Triton adds the dtypes of the tensors);
    ``prune(configs, named_args)`` returns the configs allowed for a launch's arguments (all of them
    when None): the autotuner times only those. ``restore`` names the tensor arguments the kernel
    may add into (rather than overwrite): a tuning launch puts them back as they were after timing.
    """
    import triton  # not at module level: kernels imports this module with or without Triton

    assert name not in _REGISTRY, f"{name} is registered twice"
    prune_by = None
    if prune is not None:
        prune_by = {"early_config_prune": lambda candidates, named_args, **kwargs:
                    prune(candidates, {**named_args, **kwargs})}
    tuner = triton.autotune(configs=list(configs), key=key, prune_configs_by=prune_by)(kernel)
    _REGISTRY[name] = Tunable(name, tuner, tuple(configs), tuple(restore))
    return _REGISTRY[name]


def tunables() -> dict[str, Tunable]:
    """Every autotuned kernel by name (its tuner, configs and choices), in registration order: for
    the tools and tests that inspect or reset the choices."""
    return _REGISTRY


def candidate_configs() -> dict[str, tuple]:
    """Every autotuned kernel's name and its candidate configs (``triton.Config``), in the order
    the ops list them: the configs :func:`use_configs` may pin."""
    return {name: tunable.configs for name, tunable in _REGISTRY.items()}


@contextlib.contextmanager
def use_configs(pins: dict):
    """Run the block with ``pins`` (kernel name -> ``triton.Config``, one of that kernel's configs).

    Pinned kernels launch with their pinned config, without autotuning; the others as usual. Names
    and configs are checked here; a pinned config that the op does not allow for some inputs
    raises ValueError when such a launch comes. :func:`candidate_configs` lists the names and configs.
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


def tuned_configs() -> list[tuple[str, tuple, str]]:
    """``(kernel name, launch key, config)`` for every choice made or read from disk in this process.

    A launch key holds what the op keys a kernel's tuning on (the token count's power-of-two
    bucket, widths, the dtype) and then the kernel's flags.
    """
    return [(name, key, describe(config)) for name, tunable in _REGISTRY.items()
            for key, config in tunable.chosen.items()]


def _autotuner_can_time() -> bool:
    """Triton's autotuner times configs on a GPU; its interpreter cannot time anything."""
    from . import _dispatch  # not at the top: _dispatch imports the op modules, which import this one
    return not _dispatch.INTERPRETED


def launch(tunable: Tunable, grid_of: Callable, args: tuple, meta: dict, key: tuple, allowed=None,
           tokens: int | None = None) -> tuple:
    """``(kernel, grid, args, meta)``: one launch of ``tunable`` with the config chosen as the module says.

    ``grid_of(block_sizes)`` gives the grid for a config's kwargs; ``key`` is what the launch's best
    config depends on (a token count's bucket, widths, the dtype: the kernel's flags are added);
    ``allowed`` is the tuple of configs the op allows for these inputs (default: all of them); ``tokens``
    is the launch's token count. Once a key has its config, a launch costs a dict lookup here: the
    kernel is launched directly, past Triton's autotuner (and its key of every argument's dtype).
    """
    allowed = tunable.configs if allowed is None else allowed
    config = _pins.get(tunable.name) if _pins else None
    if config is not None and config not in allowed:
        raise ValueError(f"the config pinned for {tunable.name}, {config}, does not fit these inputs; "
                         f"allowed: {list(allowed)}")
    if config is None and tokens is not None and tokens <= SMALL_TOKENS:
        config = _smallest_and_largest(allowed)[0]
    if config is None and not _autotuner_can_time():
        config = _smallest_and_largest(allowed)[1]
    if config is None:
        if not tunable.loaded:
            _load_disk_cache(tunable)
        key = (*key, *meta.values())
        config = tunable.chosen.get(key)
        if config is None or config not in allowed:  # none yet, or one the disk held that these inputs forbid
            return _TuneOnce(tunable, key, allowed), grid_of, args, meta
    return tunable.fn, grid_of(config.kwargs), args, {**meta, **_launch_options(config)}


def _memo_by_identity(compute: Callable) -> Callable:
    """``compute(obj)`` computed once per object, looked up by the object's identity: for the ops'
    long-lived config tuples and configs, which a hash would cost more than the lookup saves (a
    triton.Config hashes by building a dict of all its fields). Each entry holds its object, so
    that the identity stays its own."""
    memo: dict[int, tuple] = {}

    def lookup(obj):
        entry = memo.get(id(obj))
        if entry is None or entry[0] is not obj:
            entry = memo[id(obj)] = obj, compute(obj)
        return entry[1]

    return lookup


@_memo_by_identity
def _smallest_and_largest(allowed: tuple) -> tuple:
    """The configs of ``allowed`` with the smallest and the largest tiles (the first of equals)."""
    return min(allowed, key=tile_size), max(allowed, key=tile_size)


@_memo_by_identity
def _launch_options(config) -> dict:
    """A config's block sizes and launch options as keyword arguments (built once per config)."""
    return config.all_kwargs()


class _TuneOnce:
    """A launch of a key with no config yet: Triton's autotuner times the configs the op allows for
    these inputs and launches the fastest, which is then the key's choice, kept on disk.

    The autotuner is given only the allowed configs, and forgets what it timed before (its own key
    leaves out what makes configs allowed or not, such as a split-K weight gradient's slices): this
    module's choices are the cache. Timing runs every config many times: a kernel that adds into an
    output (``Tunable.restore``) would add each run's result. Those outputs are copied first and put
    back after the timing, and the chosen config then makes the one launch that counts.
    """

    def __init__(self, tunable: Tunable, key: tuple, allowed: tuple):
        self.tunable, self.key, self.allowed = tunable, key, allowed

    def __getitem__(self, grid_of):
        def tune_and_launch(*args, **meta):
            tunable, tuner = self.tunable, self.tunable.tuner
            named = dict(zip(tuner.arg_names, args))
            saved = [(named[name], named[name].clone()) for name in tunable.restore if named.get(name) is not None]
            every_config, tuner.configs = tuner.configs, list(self.allowed)
            tuner.cache.clear()
            try:
                tuner[grid_of](*args, **meta)
            finally:
                tuner.configs = every_config
            best = tuner.best_config
            assert best in self.allowed, f"{tunable.name}'s autotuner chose {best}, which these inputs do not allow"
            tunable.chosen[self.key] = best
            _save_disk_cache(tunable)
            if saved:
                for tensor, copy in saved:
                    tensor.copy_(copy)
                tunable.fn[grid_of(best.kwargs)](*args, **meta, **_launch_options(best))
        return tune_and_launch


def compile_launch(launch: tuple, part: tuple[int, int] = (0, 1)) -> int:
    """Compile a launch's kernel without running it, as its first real launch would: Triton keeps it
    in its disk cache, where a later process finds it. A launch that awaits tuning compiles each
    config the op allows for its inputs, or with ``part`` = (i, n) those at positions i, i + n, ...
    (n processes share the work); any other launch is compiled by part 0 only. Returns how many
    kernels it asked Triton to compile (those already in a cache cost a lookup)."""
    kernel, grid, args, meta = launch
    index, parts = part
    if isinstance(kernel, _TuneOnce):
        configs = kernel.allowed[index::parts]
        for config in configs:
            kernel.tunable.fn.warmup(*args, grid=grid(config.kwargs), **meta, **_launch_options(config))
        return len(configs)
    if index:
        return 0
    kernel.warmup(*args, grid=grid, **meta)
    return 1


# --------------------------------------------------------------------------- the disk cache


def cache_file() -> Path | None:
    """The file holding this process's autotuning choices: one per triton version and GPU, in
    :func:`fastgpt_kernels._io.cache_directory` (None when there is none)."""
    import triton

    return _io.cache_file(f"triton-{triton.__version__}")


def _read_cache(path: Path | None) -> dict:
    """The cache file's entries, kernel name -> ``{"source": str, "choices": [[key, index, str], ...]}``:
    an entry of any other shape is left out (tuned again, and rewritten)."""
    stored = _io.read_cache(path)
    if not isinstance(stored, dict):  # none yet, or damaged: tune again (and rewrite it)
        return {}
    return {name: entry for name, entry in stored.items() if _well_formed(entry)}


def _well_formed(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("source"), str)
            and isinstance(entry.get("choices"), list)
            and all(isinstance(c, list) and len(c) == 3 and isinstance(c[0], list) and type(c[1]) is int
                    and c[1] >= 0 and isinstance(c[2], str) for c in entry["choices"]))


def _source_key(tunable: Tunable) -> str:
    """The kernel's source hash (Triton's, which covers the functions it calls; the Python source's
    in the interpreter): a changed kernel does not reuse an old kernel's choices."""
    key = getattr(tunable.fn, "cache_key", None)
    return key if key is not None else hashlib.sha256(inspect.getsource(tunable.fn.fn).encode()).hexdigest()


def _load_disk_cache(tunable: Tunable) -> None:
    """Take the choices the disk cache holds for ``tunable``: a choice is stored as its config's index
    and description, and taken only where both still match (and the kernel's source). Whether a
    launch's inputs allow it is checked at the launch."""
    tunable.loaded = True
    entry = _read_cache(cache_file()).get(tunable.name, {})
    if entry.get("source") != _source_key(tunable):
        return
    for key, index, described in entry["choices"]:
        if index < len(tunable.configs) and describe(tunable.configs[index]) == described:
            tunable.chosen.setdefault(_as_key(key), tunable.configs[index])


def _as_key(stored: list) -> tuple:
    """A launch key as JSON stored it (lists for tuples)."""
    return tuple(_as_key(part) if isinstance(part, list) else part for part in stored)


def _save_disk_cache(tunable: Tunable) -> None:
    """Write ``tunable``'s choices into the disk cache (the other kernels' entries kept)."""
    path = cache_file()
    stored = _read_cache(path)
    stored[tunable.name] = {"source": _source_key(tunable), "choices": [
        [list(key), tunable.configs.index(config), describe(config)] for key, config in tunable.chosen.items()]}
    _io.write_cache(path, stored)
