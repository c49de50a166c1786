"""Package attributes imported on first use (PEP 562), so that importing a package imports no torch.

``fastgpt_kernels``, ``fastgpt`` and ``fastgpt.data`` hand on names defined in their modules. They
do it through :func:`lazy_attributes`, so the torch-free parts of both packages (process handling,
atomic files, corpus preparation) import without torch: ``fastgpt-prepare`` and its worker
processes never load it.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_attributes(package: str, homes: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the module ``package``.

    Args:
        package: the module's ``__name__``.
        homes: each name handed on, mapped to the module that defines it, relative to ``package``
            (``".model"``). On the first use of any of them, every name from that module is set on
            ``package`` (but those already set there, by the user or a patch), so later lookups never
            come back here.

    Any other name that is not a dunder is imported as a submodule of ``package`` when one exists,
    as if the package had imported it; otherwise it raises ``AttributeError``.
    """
    def __getattr__(name: str) -> object:
        module = sys.modules[package]
        if name in homes:
            home = importlib.import_module(homes[name], package)
            for handed, where in homes.items():
                if where == homes[name]:
                    vars(module).setdefault(handed, getattr(home, handed))
            return vars(module)[name]
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
