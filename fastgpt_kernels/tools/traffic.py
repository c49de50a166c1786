"""Memory-traffic counters: how many bytes a computation moves, a model of traffic, not a GPU measurement.

:func:`count_memory_traffic` counts what Triton kernels run in Triton's interpreter load and store;
:func:`count_torch_traffic` counts what unfused PyTorch code would move (each op reading its inputs
and writing its outputs once). Test and benchmark tooling, never used by the ops.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

__all__ = ["MemoryTraffic", "count_memory_traffic", "count_torch_traffic"]

class MemoryTraffic:
    """Bytes moved by the active lanes of loads and stores (a model of traffic, not a measurement).

    ``loaded`` / ``stored`` count every requested byte; ``distinct_loaded`` / ``distinct_stored``
    count each byte address once: the compulsory traffic with a perfect cache. ``out_of_bounds``
    counts active lanes that fall outside every tensor passed to an interpreted kernel;
    ``reads_after_writes`` counts loaded lanes whose address a store of the same launch had
    written before: a kernel reading back memory it wrote, which on a GPU needs a barrier (within
    a program) or is a race (between programs). Both are always 0 for :func:`count_torch_traffic`.
    """

    def __init__(self):
        self.loaded = 0
        self.stored = 0
        self.out_of_bounds = 0
        self.reads_after_writes = 0
        self._addresses: dict[str, list] = {"load": [], "store": []}

    def __repr__(self):
        return f"MemoryTraffic(loaded={self.loaded}, stored={self.stored}, out_of_bounds={self.out_of_bounds})"

    @property
    def distinct_loaded(self) -> int:
        return self._distinct("load")

    @property
    def distinct_stored(self) -> int:
        return self._distinct("store")

    def _distinct(self, kind: str) -> int:
        by_size: dict[int, list] = {}
        for size, addresses in self._addresses[kind]:
            by_size.setdefault(size, []).append(addresses)
        return sum(size * np.unique(np.concatenate(chunks)).size for size, chunks in by_size.items())


_TRAFFIC_METHODS = (("InterpreterBuilder", "create_masked_load"), ("InterpreterBuilder", "create_masked_store"),
                    ("GridExecutor", "_init_args_hst"))


@contextlib.contextmanager
def count_memory_traffic():
    """Count the bytes that Triton kernels interpreted in this block load and store.

    Yields a :class:`MemoryTraffic` filled as the kernels run: only lanes whose mask is true count,
    each at the element size of its pointer. Every unmasked lane is also checked against the storage
    of the tensors the kernel was launched with. Wraps the interpreter's builder methods (and its
    argument staging), so it works only with ``TRITON_INTERPRET=1`` and the interpreter it was
    written for: raises RuntimeError if those methods are missing.
    """
    from triton.runtime import interpreter as it

    owners = {"InterpreterBuilder": it.InterpreterBuilder, "GridExecutor": getattr(it, "GridExecutor", None)}
    missing = [f"{o}.{n}" for o, n in _TRAFFIC_METHODS if not callable(getattr(owners[o], n, None))]
    if missing:
        raise RuntimeError(f"count_memory_traffic cannot wrap this triton's interpreter: missing {', '.join(missing)}")
    traffic = MemoryTraffic()
    extents: list[tuple[int, int]] = []  # [start, end) byte ranges of the launched kernels' tensors
    stored_this_launch: list = []  # addresses the running launch has stored to
    originals = {(o, n): getattr(owners[o], n) for o, n in _TRAFFIC_METHODS}

    def record(kind, ptrs, mask):
        addresses = np.asarray(ptrs.data, dtype=np.uint64)[np.broadcast_to(np.asarray(mask.data, dtype=bool),
                                                                           np.shape(ptrs.data))]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        if kind == "load":
            traffic.loaded += size * addresses.size
        else:
            traffic.stored += size * addresses.size
        traffic._addresses[kind].append((size, addresses))
        if kind == "store":
            stored_this_launch.append(addresses)
        elif stored_this_launch:
            traffic.reads_after_writes += int(np.isin(addresses, np.concatenate(stored_this_launch)).sum())
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end in extents:
            inside |= (addresses >= start) & (addresses + size <= end)
        traffic.out_of_bounds += int((~inside).sum())

    def load(self, ptrs, mask, *args, **kwargs):
        record("load", ptrs, mask)
        return originals[("InterpreterBuilder", "create_masked_load")](self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        record("store", ptrs, mask)
        return originals[("InterpreterBuilder", "create_masked_store")](self, ptrs, value, mask, *args, **kwargs)

    def stage_args(self, *args, **kwargs):
        staged = originals[("GridExecutor", "_init_args_hst")](self, *args, **kwargs)
        extents.clear()
        stored_this_launch.clear()
        pending = list(staged)
        while pending:
            item = pending.pop()
            if isinstance(item, (list, tuple)):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item.values())
            elif hasattr(item, "untyped_storage"):
                storage = item.untyped_storage()
                extents.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return staged

    replacements = {"create_masked_load": load, "create_masked_store": store, "_init_args_hst": stage_args}
    for owner, name in _TRAFFIC_METHODS:
        setattr(owners[owner], name, functools.wraps(originals[(owner, name)])(replacements[name]))
    try:
        yield traffic
    finally:
        for (owner, name), original in originals.items():
            setattr(owners[owner], name, original)


@contextlib.contextmanager
def count_torch_traffic():
    """Count the bytes that PyTorch ops run in this block would move, unfused.

    Yields a :class:`MemoryTraffic`: every aten op that is not a view reads each of its tensor
    inputs once and writes each of its outputs once (``distinct_*`` are not tracked: 0).
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    traffic = MemoryTraffic()

    def nbytes(tree):
        return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                traffic.loaded += nbytes((args, kwargs))
                traffic.stored += nbytes(out)
            return out

    with Counter():
        yield traffic
