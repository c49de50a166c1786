"""The memory-traffic counters of kernels._interpreter (byte counts that model traffic, not GPU measurements)."""
import pytest
import torch

from kernels import _dispatch, _interpreter


@pytest.mark.skipif(not _dispatch.INTERPRETED, reason="counts bytes in Triton's interpreter")
def test_traffic_counter_flags_out_of_bounds_lanes_and_needs_its_hooks(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X_ptr, Y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y_ptr + offs, tl.load(X_ptr + offs, mask=offs < n), mask=offs < n)

    x, y = torch.arange(8.0), torch.empty(16)
    with _interpreter.count_memory_traffic() as traffic:
        copy_kernel[(1,)](x, y, 8, BLOCK=16)
    assert (traffic.loaded, traffic.stored, traffic.out_of_bounds) == (32, 32, 0)
    with _interpreter.count_memory_traffic() as traffic:
        copy_kernel[(1,)](x, y, 12, BLOCK=16)  # reads 4 elements past x
    assert traffic.out_of_bounds == 4
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_masked_store")
    with pytest.raises(RuntimeError, match="create_masked_store"):
        with _interpreter.count_memory_traffic():
            pass


def test_torch_counter_counts_each_op_reading_inputs_and_writing_outputs_once():
    x, y = torch.ones(100), torch.ones(100)  # 400 bytes each
    with _interpreter.count_torch_traffic() as traffic:
        z = (x + y).view(10, 10).t()  # one add; the views move nothing
        z.sum()  # reads 400 bytes, writes a 4-byte scalar
    assert (traffic.loaded, traffic.stored) == (3 * 400, 400 + 4)
