"""Ahead-of-time compilation report for the project's Triton kernels on sm_80 (A100) and sm_90a (H100).

``python -m fastgpt_kernels.tools.compile_report`` compiles every kernel in every config it can launch with,
using the installed triton wheel's own toolchain and no GPU. Each op's declaration
(:mod:`fastgpt_kernels.registry`) lists its launches as :class:`CompileSpec` objects; every spec is specialised exactly as
``JITFunction.run`` would specialise the launch (pointer alignment, ints equal to 1 or divisible by
16, constexprs, ``num_warps``/``num_stages``) and compiled to a cubin for each target. ``--largest``
compiles only each kernel's most demanding specs. Run it with another triton by putting that
wheel's files first on ``PYTHONPATH`` (``pip install --no-deps --target DIR triton==X``).

Per kernel, config and arch the report checks:

* the kernel compiles at all (e.g. ``tl.dot`` shapes the GPU backend rejects);
* shared memory (``metadata.shared``, which ``triton.compile`` never checks) is within the
  opt-in per-block limit: 166912 B on sm_80, 232448 B on sm_90;
* no register spills (``ptxas -v`` spill bytes, LDL/STL in the SASS);
* a spec with ``uses_tensor_cores=True`` uses them: HMMA on sm_80, HGMMA (wgmma) on sm_90a;
* and it counts 128-bit global loads/stores (LDG/LDGSTS/STG with ``.128``) for information.

It is a static check of the generated code: nothing runs, nothing is timed, and numerical
correctness is left to the tests. Exit status 1 on any compile error, shared-memory overflow,
spill, or missing tensor-core instructions.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import inspect
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

from fastgpt_kernels import registry
from fastgpt_kernels.registry import OPS, CompileSpec

SHARED_LIMITS = {80: 166912, 90: 232448}  # opt-in max dynamic shared memory per block, bytes
TENSOR_CORE_OPS = {80: "HMMA", 90: "HGMMA"}
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}


@dataclasses.dataclass
class Result:
    """What compiling one spec for one arch produced (``None`` fields: not measured, see ``error``)."""
    kernel: str
    config: str
    arch: int
    shared: int | None = None
    shared_limit: int = 0
    registers: int | None = None
    spill_bytes: int | None = None
    local_ops: int | None = None          # LDL/STL instructions in the SASS
    tensor_core_ops: int | None = None    # HMMA on sm_80, HGMMA on sm_90a
    mma_sync_ops: int | None = None       # HMMA on sm_90a: tensor cores, but not wgmma
    vector_loads: int | None = None
    vector_stores: int | None = None
    uses_tensor_cores: bool = False
    seconds: float = 0.0
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        """Why this result fails the report; empty when it passes."""
        if self.error is not None:
            return [f"compile error: {_last_line(self.error)}"]
        found = []
        if self.shared > self.shared_limit:
            found.append(f"shared memory {self.shared} B > limit {self.shared_limit} B")
        if self.spill_bytes or self.local_ops:
            found.append(f"register spills: {self.spill_bytes} B, {self.local_ops} LDL/STL")
        if self.uses_tensor_cores and not self.tensor_core_ops:
            op = TENSOR_CORE_OPS[self.arch]
            extra = f" (only {self.mma_sync_ops} HMMA: no wgmma)" if self.mma_sync_ops else ""
            found.append(f"tl.dot without {op} tensor-core instructions{extra}")
        return found


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def _triton_api():
    """The semi-private Triton pieces the report relies on, or a clear error naming the version."""
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        if not hasattr(JITFunction, "_pack_args"):
            raise ImportError("JITFunction._pack_args is missing")
    except ImportError as exc:
        raise RuntimeError(f"fastgpt_kernels.tools.compile_report does not support triton {triton.__version__}: "
                           f"the compiler API it uses is missing ({exc}); it supports triton 3.5 to 3.9") from exc
    return triton, GPUTarget, get_ptxas, ASTSource, make_backend, JITFunction, create_function_from_signature


def _kernel_name(kernel) -> str:
    """The Python name of a kernel, through any Autotuner/Heuristics/JITFunction wrappers."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", repr(kernel))


def _jit_function(kernel, JITFunction):
    """Unwrap Autotuner/Heuristics wrappers down to the JITFunction."""
    fn = kernel
    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{kernel!r} is not a @triton.jit function; kernels imported with TRITON_INTERPRET=1 "
                        f"cannot be compiled: import them with the interpreter off")
    return fn


def specialize(spec: CompileSpec, arch: int):
    """``(fn, options, signature, constexprs, attrs)`` for ``spec`` on ``sm_<arch>``.

    Runs Triton's own argument binder and packing, as ``JITFunction.run`` does for a launch, but with
    the backend of the target arch instead of the active driver's.
    """
    triton, GPUTarget, _, _, make_backend, JITFunction, create_function_from_signature = _triton_api()
    fn = _jit_function(spec.kernel, JITFunction)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(spec.kwargs)
    # The launch-time options JITFunction.run adds before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(triton.knobs.compilation, name):
            kwargs[name] = getattr(triton.knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    if options.arch != f"sm{arch}":
        raise RuntimeError(f"options target {options.arch}, not sm{arch}: unset TRITON_OVERRIDE_ARCH")
    return fn, options, signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton
    return getattr(triton.knobs.nvidia, name).path


def _ptxas(get_ptxas, arch: int) -> str:
    """The ptxas Triton itself compiles ``sm_<arch>`` with (triton 3.5 has one for every arch)."""
    return (get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()).path


def _run_tool(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout + proc.stderr


def _ptxas_usage(ptx: str, arch: int, options, get_ptxas) -> tuple[int, int]:
    """``(registers, spill bytes)`` from ``ptxas -v``, run with the flags Triton's make_cubin uses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_ptxas(get_ptxas, arch), "-lineinfo", *([] if options.enable_fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", *(options.ptx_options.split() if options.ptx_options else []),
               f"--gpu-name={ARCH_NAMES[arch]}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = _run_tool(cmd)
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", re.MULTILINE)


def _sass_opcodes(cubin: bytes) -> collections.Counter:
    """Opcode counts (``"HMMA.16816.F32"`` etc.) of ``cuobjdump -sass`` on the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return collections.Counter(_SASS_LINE.findall(_run_tool([_tool("cuobjdump"), "-sass", path])))


def _count(opcodes: collections.Counter, bases: tuple[str, ...], width: str | None = None) -> int:
    """How many instructions have an opcode base in ``bases`` (and ``width`` among its modifiers)."""
    return sum(n for op, n in opcodes.items()
               if op.split(".")[0] in bases and (width is None or width in op.split(".")[1:]))


def compile_spec(spec: CompileSpec, arch: int) -> Result:
    """Compile ``spec`` for ``sm_<arch>`` (80 or 90) offline and measure the generated code.

    Never raises for a kernel that fails to compile: the failure goes in ``Result.error``.
    """
    if arch not in SHARED_LIMITS:
        raise ValueError(f"arch must be one of {sorted(SHARED_LIMITS)}, got {arch!r}")
    result = Result(kernel=_kernel_name(spec.kernel), config=spec.config, arch=arch,
                    shared_limit=SHARED_LIMITS[arch], uses_tensor_cores=spec.uses_tensor_cores)
    start = time.perf_counter()
    try:
        triton, GPUTarget, get_ptxas, ASTSource, *_ = _triton_api()
        # triton prints the whole PTX to stdout when ptxas fails (the error says enough), and warns
        # about its own defaults once per process.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn, options, signature, constexprs, attrs = specialize(spec, arch)
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options.__dict__)
        result.shared = int(compiled.metadata.shared)
        result.registers, result.spill_bytes = _ptxas_usage(compiled.asm["ptx"], arch, options, get_ptxas)
        opcodes = _sass_opcodes(compiled.asm["cubin"])
        result.local_ops = _count(opcodes, ("LDL", "STL"))
        result.tensor_core_ops = _count(opcodes, (TENSOR_CORE_OPS[arch],))
        result.mma_sync_ops = _count(opcodes, ("HMMA",)) if arch >= 90 else 0
        result.vector_loads = _count(opcodes, ("LDG", "LDGSTS"), "128")
        result.vector_stores = _count(opcodes, ("STG",), "128")
    except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
        result.error = f"{type(exc).__name__}: {exc}".strip()
    result.seconds = time.perf_counter() - start
    return result


_POOL_SPECS: list = []  # the specs, inherited by forked workers (JITFunctions do not pickle)


def _compile_task(index: int, arch: int) -> Result:
    return compile_spec(_POOL_SPECS[index], arch)


def _progress(done: int, total: int, r: Result, stream) -> None:
    if stream is None:
        return
    status = "ok" if not r.problems else "; ".join(r.problems)
    print(f"[{done}/{total}] {r.kernel} [{r.config}] {ARCH_NAMES[r.arch]}: {status} ({r.seconds:.1f} s)",
          file=stream, flush=True)


def run(specs, archs=(80, 90), jobs=2, progress=sys.stderr) -> list[Result]:
    """Compile every spec for every arch; results in (spec, arch) order.

    Compiles run in ``jobs`` forked worker processes (in this process when ``jobs <= 1``), and one
    progress line per finished compile goes to ``progress`` (``None`` for silence).
    """
    specs = list(specs)
    tasks = [(i, arch) for i in range(len(specs)) for arch in archs]
    results: list[Result | None] = [None] * len(tasks)
    fork = "fork" in multiprocessing.get_all_start_methods()
    if jobs <= 1 or len(tasks) <= 1 or not fork:
        for n, (i, arch) in enumerate(tasks):
            results[n] = compile_spec(specs[i], arch)
            _progress(n + 1, len(tasks), results[n], progress)
        return results
    from fastgpt_kernels import _processes

    global _POOL_SPECS
    _POOL_SPECS = specs
    try:
        with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("fork"),
                                 initializer=_processes.watch, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(_compile_task, i, arch): n for n, (i, arch) in enumerate(tasks)}
            for done, future in enumerate(as_completed(futures), 1):
                n = futures[future]
                try:
                    results[n] = future.result()
                except Exception as exc:  # a crashed worker (e.g. a segfault in the compiler)
                    i, arch = tasks[n]
                    results[n] = Result(kernel=_kernel_name(specs[i].kernel), config=specs[i].config,
                                        arch=arch, shared_limit=SHARED_LIMITS[arch],
                                        uses_tensor_cores=specs[i].uses_tensor_cores,
                                        error=f"worker failed: {type(exc).__name__}: {exc}")
                _progress(done, len(tasks), results[n], progress)
    finally:
        _POOL_SPECS = []
    return results


def format_table(results: list[Result]) -> str:
    """The results as a fixed-width text table, one row per (kernel, config, arch)."""
    header = ("kernel", "config", "arch", "shared/limit", "regs", "spill", "tc ops", "ld128", "st128", "status")
    rows = []
    for r in results:
        if r.error is not None:
            rows.append((r.kernel, r.config, ARCH_NAMES[r.arch], "-", "-", "-", "-", "-", "-",
                         "; ".join(r.problems)))
            continue
        tc = f"{r.tensor_core_ops} {TENSOR_CORE_OPS[r.arch]}" if r.tensor_core_ops or r.uses_tensor_cores else "-"
        rows.append((r.kernel, r.config, ARCH_NAMES[r.arch], f"{r.shared}/{r.shared_limit}", str(r.registers),
                     str(r.spill_bytes), tc, str(r.vector_loads), str(r.vector_stores),
                     "; ".join(r.problems) or "ok"))
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
                     for row in [header, *rows])


def compile_specs(ops=OPS, largest_only: bool = False) -> list[CompileSpec]:
    """The specs the declarations of ``ops`` (all by default) list; only the ``largest`` ones when
    ``largest_only``: each kernel's most demanding configurations (the largest tiles, head
    dimensions and flags, where registers and shared memory peak), the reduced set compiled under
    every supported triton when the full set is compiled under fewer."""
    specs = [spec for op in ops for spec in registry.declaration(op).compile_specs()]
    return [s for s in specs if s.largest] if largest_only else specs


def _collect_specs(ops, modules, largest_only: bool) -> list[CompileSpec]:
    """The specs of the given ops (:func:`compile_specs`), or ``compile_specs()`` of other modules."""
    if modules:
        specs = [spec for name in modules for spec in importlib.import_module(name).compile_specs()]
        return [s for s in specs if s.largest] if largest_only else specs
    unknown = set(ops or ()) - set(OPS)
    if unknown:
        raise SystemExit(f"unknown op(s) {', '.join(sorted(unknown))}; ops: {', '.join(OPS)}")
    return compile_specs(ops or OPS, largest_only)


def main(argv=None) -> int:
    """Command line entry point; returns the exit status (0: every compile clean, 1: problems)."""
    parser = argparse.ArgumentParser(prog="python -m fastgpt_kernels.tools.compile_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMITS),
                        help="target compute capability, repeatable (default: 80 and 90)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--largest", action="store_true", help="only each kernel's most demanding specs")
    parser.add_argument("--kernel", help="only kernels whose name contains this substring")
    parser.add_argument("--module", action="append",
                        help="collect compile_specs() from this importable module instead of the op modules")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    from fastgpt_kernels import _dispatch, _processes
    if _dispatch.NO_TRITON_REASON:
        print(f"cannot compile the kernels: {_dispatch.NO_TRITON_REASON}", file=sys.stderr)
        return 2
    if _dispatch.INTERPRETED:
        # @triton.jit made interpreter functions, which cannot be compiled: start over without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        print("TRITON_INTERPRET is on: re-running with the interpreter off", file=sys.stderr)
        with _processes.stop_on_signals():  # a stopped parent kills the child, whose workers follow it
            return subprocess.run([sys.executable, "-m", "fastgpt_kernels.tools.compile_report", *argv],
                                  env=env).returncode

    specs = _collect_specs(args.op, args.module, args.largest)
    if args.kernel:
        specs = [s for s in specs if args.kernel in _kernel_name(s.kernel)]
    if not specs:
        print("no compile specs to check", file=sys.stderr)
        return 1
    archs = tuple(dict.fromkeys(args.arch or (80, 90)))
    with _processes.stop_on_signals():  # SIGTERM and SIGHUP stop the compile workers as Ctrl-C does
        results = run(specs, archs=archs, jobs=args.jobs)

    print(format_table(results))
    failed = [r for r in results if r.problems]
    errors: dict[tuple[str, str, str], list[str]] = {}
    for r in failed:
        if r.error is not None:
            errors.setdefault((r.kernel, r.config, r.error), []).append(ARCH_NAMES[r.arch])
    for (kernel, config, error), archs_failed in errors.items():
        print(f"\n{kernel} [{config}] {', '.join(archs_failed)}:\n{error}")
    compiled = sum(r.error is None for r in results)
    print(f"\n{compiled} compiled, {len(failed)} problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
