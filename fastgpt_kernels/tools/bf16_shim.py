"""A bfloat16 shim for Triton's interpreter (``TRITON_INTERPRET=1``): test tooling, never used by the ops.

Why a bfloat16 shim exists
--------------------------
NumPy has no bfloat16 type, so Triton's interpreter (``triton.runtime.interpreter``) keeps a
bfloat16 value as its raw 16-bit pattern in a ``uint16`` array and then runs the ordinary NumPy
operation on that array. Everything that treats the payload as a number is therefore wrong: ``a +
b`` adds bit patterns as integers, comparisons and min/max order them as unsigned integers (so
every negative number is "larger" than every positive one), ``tl.dot`` multiplies the integers,
``tl.sum`` / ``tl.cumsum`` add them up, and ``fma`` / ``exp`` / ... do the same. Conversions are
off too: float32 -> bfloat16 (``.to(tl.bfloat16)`` and the implicit cast in ``tl.store`` to a
bfloat16 pointer) truncates where a GPU rounds to nearest even, and integer / float64 ->
bfloat16 casts produce garbage. Moving bits around (loads, stores, ``tl.where``, reshapes,
broadcasts) is fine as it is.

:func:`install_bf16_shim` patches ``InterpreterBuilder`` (and the reductions the interpreter runs
directly in NumPy: sum, min/max with indices, cumsum, cumprod) so that bfloat16 operands are decoded exactly to float32, the
operation runs on the decoded values, and a bfloat16 result is encoded again with
round-to-nearest-even (NaN and infinity preserved). Rounding an exact float32 sum, difference,
product, quotient or square root to bfloat16 rounds correctly (float32 carries more than twice
bfloat16's precision), so these match a GPU's native bfloat16 arithmetic. ``fma`` is rounded once
from the exact value, as ``fma.rn.bf16`` does.

Scope: this is for verifying kernels in the interpreter on CPU only. It changes nothing unless
called, it is never used on a GPU path, and it was written against one Triton release:
:func:`install_bf16_shim` refuses to run on any other so that a changed interpreter is looked at
again rather than silently mis-patched.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import triton

__all__ = ["install_bf16_shim", "bf16_shim_installed", "SUPPORTED_TRITON"]

#: The Triton release series the shim was written against and checked on.
SUPPORTED_TRITON = "3.9"

# Attribute set on InterpreterBuilder once patched; holds {(owner name, attribute): original}.
_MARKER = "_bf16_shim_originals"

# Builder methods whose bfloat16 operands are decoded, computed in float32, and whose floating
# result is encoded back to bfloat16 when the operand at the given position was bfloat16.
# Comparisons produce booleans, which are passed through as int1.
_ELEMENTWISE = {
    **{name: 0 for name in (
        # binary arithmetic
        "create_fadd", "create_fsub", "create_fmul", "create_fdiv", "create_frem",
        "create_precise_divf", "create_approx_divf",
        # min / max (NaN-propagating and NaN-ignoring)
        "create_minimumf", "create_minnumf", "create_maximumf", "create_maxnumf", "create_clampf",
        # ordered and unordered float comparisons
        "create_fcmpOLT", "create_fcmpOGT", "create_fcmpOLE", "create_fcmpOGE", "create_fcmpOEQ",
        "create_fcmpONE", "create_fcmpULT", "create_fcmpUGT", "create_fcmpULE", "create_fcmpUGE",
        "create_fcmpUEQ", "create_fcmpUNE",
        # unary
        "create_fneg", "create_exp", "create_exp2", "create_log", "create_log2", "create_sqrt",
        "create_precise_sqrt", "create_rsqrt", "create_sin", "create_cos", "create_floor",
        "create_ceil", "create_erf",
    )},
    # dot(a, b, acc, ...): the result has the accumulator's type.
    "create_dot": 2,
}

# Builder methods replaced outright (see the functions below).
_REPLACED = ("cast_impl", "create_fp_to_fp", "create_fma")

# Builder attributes that are not patched but must still route through ``cast_impl``.
_VIA_CAST_IMPL = ("create_si_to_fp", "create_ui_to_fp", "create_fp_to_si", "create_fp_to_ui",
                  "create_fp_ext", "create_fp_trunc", "create_int_cast")

# Builder methods that are already right on bfloat16 bit patterns and are left alone.
#   create_fabs: clears the sign bit of the 16-bit pattern, exactly what the hardware does.
#   create_select / ternary_op: np.where moves the uint16 payloads unchanged.
_BIT_EXACT = ("create_fabs", "create_select")

# Reductions and scans implemented directly in NumPy by the interpreter.
_REDUCTIONS = {"ReduceOps": ("sum", "min_max"), "ScanOps": ("cumsum", "cumprod")}


def _interp():
    from triton.runtime import interpreter
    return interpreter


def bf16_shim_installed() -> bool:
    """Whether :func:`install_bf16_shim` has patched the interpreter in this process."""
    return getattr(_interp().InterpreterBuilder, _MARKER, None) is not None


def _check_version() -> None:
    version = str(getattr(triton, "__version__", "unknown"))
    if not re.match(r"^" + re.escape(SUPPORTED_TRITON) + r"(\.|$)", version):
        raise RuntimeError(
            f"the interpreter bfloat16 shim was written against triton {SUPPORTED_TRITON}.x, "
            f"but triton {version} is installed; re-check triton/runtime/interpreter.py and the "
            f"shim before running bfloat16 kernels in the interpreter")


def install_bf16_shim() -> None:
    """Make Triton's interpreter compute on bfloat16 values instead of their bit patterns.

    Idempotent. Raises RuntimeError (and patches nothing) when the installed Triton is not a
    release the shim was written against, or when an attribute it patches is missing.
    """
    _check_version()
    it = _interp()
    builder = it.InterpreterBuilder
    if getattr(builder, _MARKER, None) is not None:
        return

    owners = {"InterpreterBuilder": builder, **{name: getattr(it, name, None) for name in _REDUCTIONS}}
    wanted = [("InterpreterBuilder", n) for n in (*_ELEMENTWISE, *_REPLACED, *_VIA_CAST_IMPL, *_BIT_EXACT)]
    wanted += [(owner, n) for owner, names in _REDUCTIONS.items() for n in names]
    missing = [f"{o}.{n}" for o, n in wanted if owners[o] is None or not callable(getattr(owners[o], n, None))]
    missing += [f"interpreter.{n}" for n in ("TensorHandle", "_get_np_dtype", "_ir") if not hasattr(it, n)]
    if missing:
        raise RuntimeError(f"the interpreter bfloat16 shim cannot patch this triton: missing {', '.join(missing)}")
    # The shim relies on these conversions dispatching to cast_impl rather than converting themselves.
    bypass = [n for n in _VIA_CAST_IMPL
              if "cast_impl" not in getattr(getattr(getattr(builder, n), "__code__", None), "co_names", ())]
    if bypass:
        raise RuntimeError(f"the interpreter bfloat16 shim expects {', '.join(bypass)} to call cast_impl")

    originals = {}

    def patch(owner_name, name, make):
        owner = owners[owner_name]
        original = getattr(owner, name)
        originals[(owner_name, name)] = original
        setattr(owner, name, make(original))

    for name, out_like in _ELEMENTWISE.items():
        patch("InterpreterBuilder", name, functools.partial(_elementwise, out_like=out_like))
    patch("InterpreterBuilder", "cast_impl", _cast_impl)
    patch("InterpreterBuilder", "create_fp_to_fp", _fp_to_fp)
    patch("InterpreterBuilder", "create_fma", _fma)
    for owner_name, names in _REDUCTIONS.items():
        for name in names:
            patch(owner_name, name, _reduction)
    setattr(builder, _MARKER, originals)
    from fastgpt_kernels import _dispatch

    _dispatch.interpreter_computes_bf16 = True  # the dispatcher may now hand bfloat16 to the kernels


# --------------------------------------------------------------------------- bit-level helpers


def _is_bf16(handle) -> bool:
    """A TensorHandle holding bfloat16 payloads (uint16 bit patterns)."""
    data = getattr(handle, "data", None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint16:
        return False
    dtype = handle.dtype
    return getattr(dtype, "scalar", dtype) == triton.language.bfloat16


def _reinterpret(array: np.ndarray, dtype) -> np.ndarray:
    """The same bits viewed as ``dtype`` (same itemsize), keeping the shape, including 0-d."""
    array = np.asarray(array)
    return np.ascontiguousarray(array).view(dtype).reshape(array.shape)


def _decode(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 values (exact)."""
    return _reinterpret(np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16), np.float32)


def _encode_f32(values: np.ndarray, truncate: bool = False) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns, round to nearest even (or toward zero).

    NaN stays NaN (sign and top payload bits kept, quiet bit set); +-inf stays +-inf.
    """
    raw = _reinterpret(np.asarray(values, dtype=np.float32), np.uint32)
    nan = (raw & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, np.uint32(0), raw)
    if not truncate:
        # Adding 0x7FFF plus the lowest kept bit rounds ties to even; a carry out of the
        # mantissa correctly bumps the exponent (up to infinity). No overflow: NaNs are zeroed.
        bits = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    nan_bits = (raw >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, nan_bits, bits >> np.uint32(16)).astype(np.uint16)


def _f64_to_f32_sticky(values: np.ndarray, truncate: bool = False) -> np.ndarray:
    """float64 -> float32 rounded to odd (or toward zero).

    Rounding to odd keeps a sticky bit, so a following round-to-nearest-even to bfloat16 gives
    the correctly rounded result of the float64 value (no double rounding).
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        f32 = values.astype(np.float32)
        back = f32.astype(np.float64)
    inexact = (back != values) & np.isfinite(values)
    rounded_away = inexact & (np.abs(back) > np.abs(values))
    f32 = np.where(rounded_away, np.nextafter(f32, np.float32(0)), f32).astype(np.float32)
    if truncate:
        return f32
    return _reinterpret(_reinterpret(f32, np.uint32) | inexact.astype(np.uint32), np.float32)


def _encode(values: np.ndarray, truncate: bool = False) -> np.ndarray:
    """Numeric values of any NumPy dtype -> bfloat16 bit patterns, correctly rounded."""
    values = np.asarray(values)
    if values.dtype == np.float32 or values.dtype == np.float16:
        return _encode_f32(values.astype(np.float32), truncate)
    return _encode_f32(_f64_to_f32_sticky(values.astype(np.float64), truncate), truncate)


# --------------------------------------------------------------------------- patched behaviour


def _as_f32(arg):
    if _is_bf16(arg):
        return _interp().TensorHandle(_decode(arg.data), triton.language.float32)
    return arg


def _elementwise(original, out_like):
    """Wrap a builder method: decode bfloat16 operands, run it in float32, re-encode the result."""

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        if not any(_is_bf16(a) for a in (*args, *kwargs.values())):
            return original(self, *args, **kwargs)
        out_bf16 = out_like < len(args) and _is_bf16(args[out_like])
        result = original(self, *map(_as_f32, args), **{k: _as_f32(v) for k, v in kwargs.items()})
        it = _interp()
        if result.data.dtype == np.bool_:
            return it.TensorHandle(result.data, triton.language.int1)
        if out_bf16 and np.issubdtype(result.data.dtype, np.floating):
            return it.TensorHandle(_encode(result.data), triton.language.bfloat16)
        return result

    return patched


def _cast_impl(original):
    """Casts to or from bfloat16 by value: exact decode, correctly rounded encode."""

    @functools.wraps(original)
    def patched(self, src, dst_type):
        bf16 = triton.language.bfloat16
        dst = dst_type.scalar
        src_bf16 = _is_bf16(src)
        if not src_bf16 and dst != bf16:
            return original(self, src, dst_type)
        it = _interp()
        if src_bf16 and dst == bf16:
            return it.TensorHandle(src.data.copy(), bf16)
        if dst == bf16:
            return it.TensorHandle(_encode(src.data), bf16)
        return it.TensorHandle(_decode(src.data).astype(it._get_np_dtype(dst)), dst)

    return patched


def _fp_to_fp(original):
    """bfloat16 <-> float16 / float32 / float64 with the requested rounding; fp8 left as it was."""

    @functools.wraps(original)
    def patched(self, src, dst_type, rounding_mode):
        tl = triton.language
        standard = (tl.float16, tl.float32, tl.float64)
        dst = dst_type.scalar
        it = _interp()
        if _is_bf16(src) and dst in standard:
            return it.TensorHandle(_decode(src.data).astype(it._get_np_dtype(dst)), dst)
        if dst == tl.bfloat16 and src.dtype.scalar in standard:
            truncate = rounding_mode == it._ir.ROUNDING_MODE.RTZ
            return it.TensorHandle(_encode(src.data, truncate=truncate), tl.bfloat16)
        return original(self, src, dst_type, rounding_mode)

    return patched


def _fma(original):
    """x * y + z on bfloat16 rounded once, like fma.rn.bf16.

    The bfloat16 product is exact in float64; the float64 sum is made round-to-odd with an
    error-free transformation (TwoSum), so the final rounding to bfloat16 is correct.
    """

    @functools.wraps(original)
    def patched(self, x, y, z):
        if not any(_is_bf16(h) for h in (x, y, z)):
            return original(self, x, y, z)
        if not _is_bf16(z):
            return original(self, _as_f32(x), _as_f32(y), _as_f32(z))
        a, b, c = (_decode(h.data).astype(np.float64) if _is_bf16(h) else h.data.astype(np.float64)
                   for h in (x, y, z))
        with np.errstate(all="ignore"):
            product = a * b
            total = product + c
            bb = total - product
            err = (product - (total - bb)) + (c - bb)
        # total is the float64 value nearest to the exact one; where it is inexact and even, step
        # to its odd neighbour on the side of the exact value (round to odd).
        even = (_reinterpret(total, np.uint64) & np.uint64(1)) == 0
        fix = np.isfinite(err) & (err != 0) & even
        total = np.where(fix, np.nextafter(total, np.where(err > 0, np.inf, -np.inf)), total)
        return _interp().TensorHandle(_encode(total), triton.language.bfloat16)

    return patched


def _tensor_as_f32(t):
    tl = triton.language
    handle = _interp().TensorHandle(_decode(t.handle.data), tl.float32)
    return tl.core.tensor(handle, t.type.with_element_ty(tl.float32) if t.type.is_block() else tl.float32)


def _tensor_as_bf16(t):
    tl = triton.language
    if not isinstance(t, tl.core.tensor) or t.dtype != tl.float32:
        return t
    handle = _interp().TensorHandle(_encode(t.handle.data), tl.bfloat16)
    return tl.core.tensor(handle, t.type.with_element_ty(tl.bfloat16) if t.type.is_block() else tl.bfloat16)


def _reduction(original):
    """Wrap ReduceOps.sum/min_max and ScanOps.cumsum/cumprod: reduce decoded values, re-encode.

    The reduction runs in float32 and rounds once at the end; a GPU combines bfloat16 partial
    results (rounding at each step, in its own order), so expect agreement to a few ulps.
    """

    @functools.wraps(original)
    def patched(self, input, *args, **kwargs):
        tl = triton.language
        value = input[0] if isinstance(input, tuple) else input
        if not (isinstance(value, tl.core.tensor) and value.dtype == tl.bfloat16 and _is_bf16(value.handle)):
            return original(self, input, *args, **kwargs)
        result = original(self, _tensor_as_f32(value), *args, **kwargs)
        if isinstance(result, (list, tuple)):
            return type(result)(_tensor_as_bf16(r) for r in result)
        return _tensor_as_bf16(result)

    return patched
