"""Tests for the bfloat16 shim in ``fastgpt_kernels/tools/bf16_shim.py``.

The kernels run in child processes with ``TRITON_INTERPRET=1`` in their environment, one with the
shim installed and one without it (to show the checks fail on the unpatched interpreter). Both
children load the shim module by file path, so they do not depend on the rest of the package,
and run at the same time. Each saves its raw outputs; the comparisons against PyTorch happen here.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SHIM_PATH = Path(__file__).resolve().parents[1] / "fastgpt_kernels" / "tools" / "bf16_shim.py"

# Runs in a child process: argv = [shim path, output file, "shim" | "raw"].
CHILD = textwrap.dedent(r'''
    import importlib.util
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET") == "1"
    import numpy as np
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as it

    shim_path, out_path, mode = sys.argv[1:4]


    def load(name):
        spec = importlib.util.spec_from_file_location(name, shim_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


    shim = load("bf16_shim_a")
    out = {}
    IB = it.InterpreterBuilder
    original_fadd = IB.__dict__["create_fadd"]
    out["installed_before"] = torch.tensor(shim.bf16_shim_installed())
    out["untouched_on_import"] = torch.tensor(IB.__dict__["create_fadd"] is original_fadd)
    if mode == "shim":
        shim.install_bf16_shim()
        patched = {n: IB.__dict__[n] for n in ("create_fadd", "cast_impl", "create_dot", "create_fma")}
        patched["sum"] = it.ReduceOps.__dict__["sum"]
        shim.install_bf16_shim()
        load("bf16_shim_b").install_bf16_shim()  # a second copy of the module sees the same state
        same = all(getattr(it.ReduceOps if n == "sum" else IB, n) is f for n, f in patched.items())
        out["idempotent"] = torch.tensor(same)
        out["installed_after"] = torch.tensor(shim.bf16_shim_installed())
        out["fadd_patched"] = torch.tensor(IB.__dict__["create_fadd"] is not original_fadd)


    @triton.jit
    def elementwise(X, Y, Z, ADD, SUB, MUL, DIV, FMA, WHERE, NEG, ABS, MAX, MIN, EXP, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0)
        y = tl.load(Y + offs, mask=m, other=1.0)
        z = tl.load(Z + offs, mask=m, other=0.0)
        tl.store(ADD + offs, x + y, mask=m)
        tl.store(SUB + offs, x - y, mask=m)
        tl.store(MUL + offs, x * y, mask=m)
        tl.store(DIV + offs, x / y, mask=m)
        tl.store(FMA + offs, tl.fma(x, y, z), mask=m)
        tl.store(WHERE + offs, tl.where((x > y) & (z <= 0.5), x * 2.0, y - 1.5), mask=m)
        tl.store(NEG + offs, -x, mask=m)
        tl.store(ABS + offs, tl.abs(x), mask=m)
        tl.store(MAX + offs, tl.maximum(x, y), mask=m)
        tl.store(MIN + offs, tl.minimum(x, y), mask=m)
        tl.store(EXP + offs, tl.exp(x.to(tl.float32)), mask=m)  # float32 result stored to bf16


    @triton.jit
    def dot(A, B, C, M: tl.constexpr):
        r = tl.arange(0, M)
        idx = r[:, None] * M + r[None, :]
        c = tl.dot(tl.load(A + idx), tl.load(B + idx))
        tl.store(C + idx, c)


    @triton.jit
    def casts(F32, I32, F16, F64, BF, OUT_IMPLICIT, OUT_EXPLICIT, OUT_RTZ, OUT_FROM_I32, OUT_FROM_F16,
              OUT_FROM_F64, OUT_TO_I32, OUT_TO_F16, OUT_TO_F32, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < N
        f = tl.load(F32 + offs, mask=m)
        tl.store(OUT_IMPLICIT + offs, f, mask=m)
        tl.store(OUT_EXPLICIT + offs, f.to(tl.bfloat16), mask=m)
        tl.store(OUT_RTZ + offs, f.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=m)
        tl.store(OUT_FROM_I32 + offs, tl.load(I32 + offs, mask=m).to(tl.bfloat16), mask=m)
        tl.store(OUT_FROM_F16 + offs, tl.load(F16 + offs, mask=m).to(tl.bfloat16), mask=m)
        tl.store(OUT_FROM_F64 + offs, tl.load(F64 + offs, mask=m).to(tl.bfloat16), mask=m)
        b = tl.load(BF + offs, mask=m)
        tl.store(OUT_TO_I32 + offs, b.to(tl.int32), mask=m)
        tl.store(OUT_TO_F16 + offs, b.to(tl.float16), mask=m)
        tl.store(OUT_TO_F32 + offs, b.to(tl.float32), mask=m)


    @triton.jit
    def reductions(X, SUM_ALL, SUM_ROWS, CUMSUM, MAX_ROWS, MIN_ROWS, ARGMAX_ROWS, MAXI_VAL, MAXI_IDX,
                   R: tl.constexpr, C: tl.constexpr):
        rows = tl.arange(0, R)
        cols = tl.arange(0, C)
        x = tl.load(X + rows[:, None] * C + cols[None, :])
        tl.store(SUM_ALL, tl.sum(tl.reshape(x, (R * C,)), axis=0))
        tl.store(SUM_ROWS + rows, tl.sum(x, axis=1))
        tl.store(CUMSUM + rows[:, None] * C + cols[None, :], tl.cumsum(x, axis=1))
        tl.store(MAX_ROWS + rows, tl.max(x, axis=1))
        tl.store(MIN_ROWS + rows, tl.min(x, axis=1))
        tl.store(ARGMAX_ROWS + rows, tl.argmax(x, axis=1))
        # tl.max/tl.min widen 16-bit floats to float32 first; with indices they reduce bfloat16 itself
        value, index = tl.max(x, axis=1, return_indices=True)
        tl.store(MAXI_VAL + rows, value)
        tl.store(MAXI_IDX + rows, index)


    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16

    # 1. elementwise
    n = 1000
    x = (torch.randn(n, generator=g) * 3).to(bf)
    y = (torch.randn(n, generator=g) * 3).to(bf)
    y[y == 0] = 1
    z = torch.randn(n, generator=g).to(bf)
    names = ["add", "sub", "mul", "div", "fma", "where", "neg", "abs", "max", "min", "exp"]
    outs = {k: torch.empty(n, dtype=bf) for k in names}
    elementwise[(1,)](x, y, z, *outs.values(), n, BLOCK=1024)
    out.update(x=x, y=y, z=z, **{"ew_" + k: v for k, v in outs.items()})

    # 2. dot
    a = torch.randn(32, 32, generator=g).to(bf)
    b = torch.randn(32, 32, generator=g).to(bf)
    c = torch.empty(32, 32, dtype=torch.float32)
    dot[(1,)](a, b, c, M=32)
    out.update(dot_a=a, dot_b=b, dot_c=c)

    # 3. casts: float32 values at and next to every kind of bfloat16 rounding boundary
    heads = np.array([0x3F80, 0x3F81, 0x3FFF, 0x4049, 0x7F7F, 0x7F7E, 0x0001, 0x0080, 0x007F,
                      0x0000, 0x1234, 0x4B00, 0x4B01], dtype=np.uint32)
    tails = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=np.uint32)
    bits = ((heads[:, None] << 16) | tails[None, :]).ravel()
    bits = np.concatenate([bits, bits | 0x80000000,
                           np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF],
                                    dtype=np.uint32)])
    f32 = torch.from_numpy(bits.view(np.float32).copy())
    m = f32.numel()
    i32 = torch.randint(-(1 << 24), 1 << 24, (m,), generator=g, dtype=torch.int32)
    i32[:6] = torch.tensor([0, 1, -1, 257, 259, 16777215], dtype=torch.int32)  # 257/259: ties
    f16 = (torch.randn(m, generator=g) * 100).to(torch.float16)
    f64 = torch.randn(m, generator=g, dtype=torch.float64) * 1e3
    # float64 values just above a bfloat16 tie by less than a float32 ulp: a float64 -> float32
    # -> bfloat16 conversion that rounds twice lands on the tie and rounds to even (down).
    f64[:4] = torch.tensor([1.0 + 2.0 ** -8 + 2.0 ** -30, -(1.0 + 2.0 ** -8 + 2.0 ** -30),
                            2.0 ** 100 * (1.5 + 2.0 ** -8 + 2.0 ** -40), 1e40], dtype=torch.float64)
    bsrc = (torch.randn(m, generator=g) * 1000).to(bf)
    bsrc[:3] = torch.tensor([-2.75, 2.75, -0.5]).to(bf)
    cast_names = ["implicit", "explicit", "rtz", "from_i32", "from_f16", "from_f64"]
    cast_outs = {k: torch.empty(m, dtype=bf) for k in cast_names}
    to_i32 = torch.empty(m, dtype=torch.int32)
    to_f16 = torch.empty(m, dtype=torch.float16)
    to_f32 = torch.empty(m, dtype=torch.float32)
    casts[(1,)](f32, i32, f16, f64, bsrc, *cast_outs.values(), to_i32, to_f16, to_f32, m, BLOCK=256)
    out.update(f32=f32, i32=i32, f16=f16, f64=f64, bsrc=bsrc, to_i32=to_i32, to_f16=to_f16, to_f32=to_f32,
               **{"cast_" + k: v for k, v in cast_outs.items()})

    # 4. reductions
    R, C = 8, 64
    xr = torch.randn(R, C, generator=g).to(bf)
    red = dict(sum_all=torch.empty(1, dtype=bf), sum_rows=torch.empty(R, dtype=bf),
               cumsum=torch.empty(R, C, dtype=bf), max_rows=torch.empty(R, dtype=bf),
               min_rows=torch.empty(R, dtype=bf), argmax_rows=torch.empty(R, dtype=torch.int32),
               maxi_val=torch.empty(R, dtype=bf), maxi_idx=torch.empty(R, dtype=torch.int32))
    reductions[(1,)](xr, *red.values(), R=R, C=C)
    out.update(xr=xr, **{"red_" + k: v for k, v in red.items()})

    # Builder-level unary/binary ops: tl.exp & co. refuse bfloat16 operands at the language level,
    # so call the interpreter's builder directly on bfloat16 handles.
    if mode == "shim":
        u = (torch.rand(257, generator=g) * 8 + 0.01).to(bf)
        u[-1] = float("nan")
        h = it.TensorHandle(u.view(torch.int16).numpy().view(np.uint16).copy(), tl.bfloat16)
        bld = it.interpreter_builder
        out["unary_in"] = u
        for name in ("exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sin", "cos", "floor", "ceil", "erf",
                     "fabs", "fneg"):
            r = getattr(bld, "create_" + name)(h)
            assert r.data.dtype == np.uint16 and r.dtype == tl.bfloat16, (name, r.data.dtype, r.dtype)
            out["unary_" + name] = torch.from_numpy(r.data.view(np.int16).copy()).view(bf)
        half = it.TensorHandle(np.full(257, 0x3F00, dtype=np.uint16), tl.bfloat16)  # 0.5
        r = bld.create_frem(h, half)
        out["frem"] = torch.from_numpy(r.data.view(np.int16).copy()).view(bf)
        r = bld.create_fcmpOLT(h, half)
        out["fcmp_dtype_is_int1"] = torch.tensor(r.dtype == tl.int1 and r.data.dtype == np.bool_)

    # The attribute check: a missing method means nothing is patched.
    if mode == "raw":
        saved = it.ScanOps.__dict__["cumprod"]
        del it.ScanOps.cumprod
        try:
            shim.install_bf16_shim()
            out["missing_attr_raises"] = torch.tensor(False)
        except RuntimeError as exc:
            out["missing_attr_raises"] = torch.tensor("ScanOps.cumprod" in str(exc))
        finally:
            it.ScanOps.cumprod = saved
        out["missing_attr_left_unpatched"] = torch.tensor(
            not shim.bf16_shim_installed() and IB.__dict__["create_fadd"] is original_fadd)

    torch.save(out, out_path)
''')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the child with and without the shim, concurrently; {"shim": results, "raw": results}."""
    tmp = tmp_path_factory.mktemp("bf16_shim")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = {}
    for mode in ("shim", "raw"):
        procs[mode] = subprocess.Popen([sys.executable, "-c", CHILD, str(SHIM_PATH), str(tmp / f"{mode}.pt"), mode],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode} child failed:\n{stdout}\n{stderr}"
        results[mode] = torch.load(tmp / f"{mode}.pt", weights_only=True)
    return results


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32)


def ulp_distance(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Distance in bfloat16 ulps (ordered bit patterns); NaN vs NaN counts as 0."""

    def ordered(t):
        b = bits(t)
        return torch.where(b < 0, -(b & 0x7FFF), b)

    both_nan = got.isnan() & want.isnan()
    return torch.where(both_nan, 0, (ordered(got) - ordered(want)).abs())


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


def elementwise_reference(r):
    x, y, z = r["x"].float(), r["y"].float(), r["z"].float()
    return {
        "add": to_bf16(x + y), "sub": to_bf16(x - y), "mul": to_bf16(x * y), "div": to_bf16(x / y),
        # the bf16 product is exact in float64, and the float64 sum of it and z is close enough
        # that rounding it to bfloat16 is at most 1 ulp from the once-rounded fma
        "fma": to_bf16(x.double() * y.double() + z.double()),
        "where": to_bf16(torch.where((x > y) & (z <= 0.5), x * 2.0, to_bf16(y - 1.5).float())),
        "neg": to_bf16(-x), "abs": to_bf16(x.abs()), "max": to_bf16(torch.maximum(x, y)),
        "min": to_bf16(torch.minimum(x, y)), "exp": to_bf16(torch.exp(x)),
    }


# 1. elementwise ----------------------------------------------------------------------------


EXACT_OPS = ["add", "sub", "mul", "div", "where", "neg", "abs", "max", "min"]


@pytest.mark.parametrize("op", EXACT_OPS + ["fma", "exp"])
def test_elementwise_bf16_matches_torch(runs, op):
    r = runs["shim"]
    want = elementwise_reference(r)[op]
    got = r["ew_" + op]
    dist = ulp_distance(got, want)
    limit = 0 if op in EXACT_OPS else 1
    assert dist.max().item() <= limit, f"{op}: {(dist > limit).sum().item()} elements off by > {limit} ulp"
    if op == "fma":
        assert (dist == 0).float().mean().item() > 0.99


@pytest.mark.parametrize("op", ["add", "mul", "fma", "where", "max"])
def test_elementwise_without_shim_is_badly_wrong(runs, op):
    r = runs["raw"]
    want = elementwise_reference(r)[op]
    dist = ulp_distance(r["ew_" + op], want)
    assert (dist > 1).float().mean().item() > 0.25, f"{op} was right without the shim: the test cannot fail"


# 2. dot ------------------------------------------------------------------------------------


def test_dot_bf16_operands_accumulate_in_fp32(runs):
    r = runs["shim"]
    want = r["dot_a"].float() @ r["dot_b"].float()
    torch.testing.assert_close(r["dot_c"], want, rtol=1e-5, atol=1e-5)
    raw = runs["raw"]
    assert not torch.allclose(raw["dot_c"], raw["dot_a"].float() @ raw["dot_b"].float(), rtol=1e-2, atol=1e-2)


# 3. casts ----------------------------------------------------------------------------------


def assert_same_bits(got, want, what):
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    bad = (bits(got) != bits(want)) & ~nan
    assert not bad.any(), (f"{what}: {bad.sum().item()} mismatches, e.g. got {hex(bits(got)[bad][0].item() & 0xFFFF)} "
                           f"want {hex(bits(want)[bad][0].item() & 0xFFFF)}")


@pytest.mark.parametrize("kind", ["implicit", "explicit"])
def test_fp32_to_bf16_rounds_to_nearest_even(runs, kind):
    r = runs["shim"]
    assert_same_bits(r["cast_" + kind], to_bf16(r["f32"]), f"float32 -> bfloat16 ({kind})")


def test_fp32_to_bf16_without_shim_truncates(runs):
    r = runs["raw"]
    want = to_bf16(r["f32"])
    assert ((bits(r["cast_implicit"]) != bits(want)) & ~want.isnan()).sum().item() > 10


def test_fp32_to_bf16_rtz(runs):
    r = runs["shim"]
    f = r["f32"]
    want = (f.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    want[f.isnan()] = float("nan")  # chopping 0x7F800001 would give infinity
    assert_same_bits(r["cast_rtz"], want, "float32 -> bfloat16 (rtz)")


def test_other_casts_to_and_from_bf16(runs):
    r = runs["shim"]
    assert_same_bits(r["cast_from_i32"], to_bf16(r["i32"]), "int32 -> bfloat16")
    assert_same_bits(r["cast_from_f16"], to_bf16(r["f16"]), "float16 -> bfloat16")
    # torch goes float64 -> float32 -> bfloat16 (two roundings); round once from the float64 value.
    f64 = r["f64"]
    lo = to_bf16(f64)
    assert_same_bits(r["cast_from_f64"][4:], lo[4:], "float64 -> bfloat16")
    want_head = torch.tensor([1.0 + 2.0 ** -7, -(1.0 + 2.0 ** -7), 2.0 ** 100 * (1.5 + 2.0 ** -7),
                              float("inf")]).to(torch.bfloat16)
    assert_same_bits(r["cast_from_f64"][:4], want_head, "float64 -> bfloat16 (just above ties)")
    assert torch.equal(r["to_i32"], r["bsrc"].to(torch.int32))
    assert torch.equal(r["to_f16"].view(torch.int16), r["bsrc"].to(torch.float16).view(torch.int16))
    assert torch.equal(r["to_f32"].view(torch.int32), r["bsrc"].float().view(torch.int32))


# 4. reductions -----------------------------------------------------------------------------


def test_sum_and_cumsum_over_bf16(runs):
    r = runs["shim"]
    x = r["xr"].float()
    assert ulp_distance(r["red_sum_all"], to_bf16(x.sum()).reshape(1)).max() <= 1
    assert ulp_distance(r["red_sum_rows"], to_bf16(x.sum(dim=1))).max() <= 1
    assert ulp_distance(r["red_cumsum"], to_bf16(x.cumsum(dim=1))).max() <= 1
    raw = runs["raw"]
    assert ulp_distance(raw["red_sum_rows"], to_bf16(raw["xr"].float().sum(dim=1))).max() > 16


def test_min_max_over_bf16(runs):
    r = runs["shim"]
    x = r["xr"]
    assert torch.equal(r["red_max_rows"], x.max(dim=1).values)
    assert torch.equal(r["red_min_rows"], x.min(dim=1).values)
    assert torch.equal(r["red_argmax_rows"].long(), x.float().argmax(dim=1))
    assert torch.equal(r["red_maxi_val"], x.max(dim=1).values)
    assert torch.equal(r["red_maxi_idx"].long(), x.float().argmax(dim=1))
    # unpatched, the uint16 ordering puts every negative number above every positive one
    raw = runs["raw"]
    assert not torch.equal(raw["red_argmax_rows"].long(), raw["xr"].float().argmax(dim=1))
    assert (raw["red_maxi_val"] < 0).all()


# builder-level ops that the language only offers on float32 ------------------------------


UNARY = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "sin": torch.sin, "cos": torch.cos, "floor": torch.floor, "ceil": torch.ceil,
    "erf": torch.erf, "fabs": torch.abs, "fneg": torch.neg,
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_builder_ops_on_bf16(runs, name):
    r = runs["shim"]
    u = r["unary_in"]
    want = to_bf16(UNARY[name](u.float()))
    limit = 0 if name in ("floor", "ceil", "fabs", "fneg", "sqrt") else 1
    assert ulp_distance(r["unary_" + name], want).max().item() <= limit


def test_frem_and_comparison_builder_ops_on_bf16(runs):
    r = runs["shim"]
    u = r["unary_in"].float()
    assert ulp_distance(r["frem"], to_bf16(torch.fmod(u, 0.5))).max().item() == 0
    assert r["fcmp_dtype_is_int1"].item()


# 5. installation ---------------------------------------------------------------------------


def test_no_patching_on_import_and_install_is_idempotent(runs):
    r = runs["shim"]
    assert not r["installed_before"].item()
    assert r["untouched_on_import"].item()
    assert r["installed_after"].item()
    assert r["fadd_patched"].item()
    assert r["idempotent"].item()
    raw = runs["raw"]
    assert not raw["installed_before"].item()


def test_missing_attribute_refuses_to_patch(runs):
    raw = runs["raw"]
    assert raw["missing_attr_raises"].item()
    assert raw["missing_attr_left_unpatched"].item()


def load_shim():
    spec = importlib.util.spec_from_file_location("bf16_shim_version_test", SHIM_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fake", ["3.10.0", "3.8.1", "4.0.0", "3.90.0"])
def test_version_guard(monkeypatch, fake):
    triton = pytest.importorskip("triton")
    from triton.runtime import interpreter as it

    shim = load_shim()
    before = dict(vars(it.InterpreterBuilder))
    monkeypatch.setattr(triton, "__version__", fake)
    with pytest.raises(RuntimeError, match=r"written against triton 3\.9"):
        shim.install_bf16_shim()
    assert dict(vars(it.InterpreterBuilder)) == before


@pytest.mark.parametrize("version", ["3.9.0", "3.9.1", "3.9.0+git1234abcd"])
def test_version_guard_accepts_3_9(monkeypatch, version):
    triton = pytest.importorskip("triton")
    shim = load_shim()
    monkeypatch.setattr(triton, "__version__", version)
    shim._check_version()
