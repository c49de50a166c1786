"""The memory-traffic counters of fastgpt_kernels.tools.traffic (byte counts that model traffic, not GPU measurements)."""
import pytest
import torch

from fastgpt_kernels import _dispatch
from fastgpt_kernels.tools import traffic as counters


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts bytes in Triton's interpreter")
def test_traffic_counter_flags_out_of_bounds_lanes_and_needs_its_hooks(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X_ptr, Y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y_ptr + offs, tl.load(X_ptr + offs, mask=offs < n), mask=offs < n)

    x, y = torch.arange(8.0), torch.empty(16)
    with counters.count_memory_traffic() as traffic:
        copy_kernel[(1,)](x, y, 8, BLOCK=16)
    assert (traffic.loaded, traffic.stored, traffic.out_of_bounds) == (32, 32, 0)
    with counters.count_memory_traffic() as traffic:
        copy_kernel[(1,)](x, y, 12, BLOCK=16)  # reads 4 elements past x
    assert traffic.out_of_bounds == 4
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_masked_store")
    with pytest.raises(RuntimeError, match="create_masked_store"):
        with counters.count_memory_traffic():
            pass


def test_torch_counter_counts_each_op_reading_inputs_and_writing_outputs_once():
    x, y = torch.ones(100), torch.ones(100)  # 400 bytes each
    with counters.count_torch_traffic() as traffic:
        z = (x + y).view(10, 10).t()  # one add; the views move nothing
        z.sum()  # reads 400 bytes, writes a 4-byte scalar
    assert (traffic.loaded, traffic.stored) == (3 * 400, 400 + 4)


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts accesses in Triton's interpreter")
def test_traffic_counter_flags_a_kernel_reading_back_what_it_wrote():
    import triton
    import triton.language as tl

    @triton.jit
    def accumulate_kernel(X_ptr, Acc_ptr, rows, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for row in range(rows):  # the partial sum makes a round trip through memory every row
            tl.store(Acc_ptr + offs, tl.load(Acc_ptr + offs) + tl.load(X_ptr + row * BLOCK + offs))

    x, acc = torch.ones(3, 16), torch.zeros(16)
    with counters.count_memory_traffic() as traffic:
        accumulate_kernel[(1,)](x, acc, 3, BLOCK=16)
    assert torch.equal(acc, torch.full((16,), 3.0))
    assert traffic.reads_after_writes == 2 * 16  # rows 1 and 2 read what rows 0 and 1 stored


def _forward_and_backward(fn, *inputs):
    out = fn(*inputs)
    torch.autograd.grad(out, [t for t in inputs if isinstance(t, torch.Tensor)], torch.randn_like(out))


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts accesses in Triton's interpreter")
@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_chunked", "attention", "attention_dropout", "gelu_mlp",
                                "linear_cross_entropy"])
def test_no_kernel_reads_back_memory_it_wrote_or_touches_memory_outside_its_tensors(op):
    """A load of an address the same launch stored to needs a barrier on a GPU, or races between
    programs; the interpreter runs programs one after another and would hide both."""
    import fastgpt_kernels

    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    calls = {
        "layer_norm": lambda: _forward_and_backward(fastgpt_kernels.layer_norm, leaf(33, 300), leaf(300), leaf(300)),
        "layer_norm_chunked": lambda: _forward_and_backward(fastgpt_kernels.layer_norm, leaf(3, 8193), leaf(8193), leaf(8193)),
        "attention": lambda: _forward_and_backward(fastgpt_kernels.attention, leaf(1, 2, 70, 16), leaf(1, 2, 70, 16),
                                                   leaf(1, 2, 70, 16)),
        "attention_dropout": lambda: _forward_and_backward(lambda q, k, v: fastgpt_kernels.attention(q, k, v, False, 0.3),
                                                           leaf(1, 1, 70, 16), leaf(1, 1, 70, 16), leaf(1, 1, 70, 16)),
        "gelu_mlp": lambda: _forward_and_backward(fastgpt_kernels.gelu_mlp, leaf(70, 16), leaf(64, 16), leaf(64), leaf(16, 64),
                                                  leaf(16)),
        "linear_cross_entropy": lambda: _forward_and_backward(
            lambda x, w, b: fastgpt_kernels.linear_cross_entropy(x, w, torch.randint(300, (70,), generator=gen), b,
                                                         reduction="none"), leaf(70, 16), leaf(300, 16), leaf(300)),
    }
    with fastgpt_kernels.use_backend("triton"), counters.count_memory_traffic() as traffic:
        calls[op]()
    assert traffic.loaded and traffic.stored
    assert traffic.reads_after_writes == 0
    assert traffic.out_of_bounds == 0
