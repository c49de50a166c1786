"""Small kernels and compile specs for tests/test_compile_report.py (import with TRITON_INTERPRET off)."""
import torch
import triton
import triton.language as tl

from fastgpt_kernels.registry import CompileSpec


@triton.jit
def scale_add_kernel(X, Y, Z, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    y = tl.load(Y + offs, mask=mask)
    tl.store(Z + offs, x * alpha + y, mask=mask)


@triton.jit
def matmul_kernel(A, B, C, M, N, K, stride_am, stride_bk, stride_cm,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty))


def _matmul_spec(config, block_m, block_n, block_k, **launch):
    a = torch.empty(512, 512, dtype=torch.float16)
    return CompileSpec(matmul_kernel, config, (a, a, a, 512, 512, 512, 512, 512, 512),
                       dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch), uses_tensor_cores=True)


def compile_specs():
    """Two clean elementwise configs, one clean matmul, and two that must be reported."""
    for dtype in (torch.float16, torch.float32):
        x = torch.empty(1 << 16, dtype=dtype)
        yield CompileSpec(scale_add_kernel, f"BLOCK=1024 warps=4 {str(dtype)[6:]}", (x, x, x, 1 << 16, 0.5),
                          dict(BLOCK=1024, num_warps=4))
    yield _matmul_spec("64x64x32 warps=4 stages=2", 64, 64, 32, num_warps=4, num_stages=2)
    # Broken on purpose: tl.dot needs K >= 16; and four 128x128x128 fp16 stages overflow shared memory.
    yield _matmul_spec("broken K=8", 64, 64, 8, num_warps=4)
    yield _matmul_spec("broken 128x128x128 stages=4", 128, 128, 128, num_warps=8, num_stages=4)
