"""kernels._tuning: the one place that picks each autotuned kernel's launch config, pins included.

On a GPU the config comes from Triton's autotuner, which times the configs the op allows. That
path runs here in Triton's interpreter, with the autotuner's timer replaced by made-up timings
(the interpreter cannot time anything): keys, pruning, the choice and the launch are Triton's own.
"""
import pytest
import torch

import kernels
from conftest import DEVICE
from kernels import _dispatch, _tuning
from kernels.ops import attention, gelu_mlp
from kernels.tools.verify import assert_pass, attention_checks, gelu_mlp_checks

pytestmark = pytest.mark.skipif(not _dispatch.INTERPRETED, reason="runs the GPU path in Triton's interpreter")


@pytest.fixture
def gpu_path(monkeypatch):
    """Take the path a GPU takes; each tuner "measures" the given tile sizes' made-up times.

    Yields ``set_times(name, {config: seconds})``; the times actually asked for are recorded in
    ``asked[name]``.
    """
    monkeypatch.setattr(_tuning, "_autotuner_can_time", lambda: True)
    asked = {}

    def set_times(name, times):
        tuner = _tuning._REGISTRY[name].tuner
        tuner.cache.clear()
        asked[name] = []

        def bench(*args, config, **meta):
            asked[name].append(config)
            return [times[config]] * 3  # the median and the 20th and 80th percentiles

        monkeypatch.setattr(tuner, "_bench", bench)

    yield set_times, asked
    for name in asked:
        _tuning._REGISTRY[name].tuner.cache.clear()


def test_the_autotuner_times_every_config_and_launches_the_fastest(gpu_path):
    set_times, asked = gpu_path
    fastest = gelu_mlp.CONFIGS[2]
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        set_times(name, {c: 1.0 if c == fastest else 2.0 for c in gelu_mlp.CONFIGS})
    assert_pass(gelu_mlp_checks(70, 48, 200, torch.float16, device=DEVICE))
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        tuner = _tuning._REGISTRY[name].tuner
        assert set(asked[name]) == set(gelu_mlp.CONFIGS)
        assert tuner.best_config == fastest
        assert fastest in tuner.cache.values()


def test_the_autotuner_times_only_the_configs_the_op_allows(gpu_path):
    set_times, asked = gpu_path
    tiles = attention._CONFIGS["fwd"]
    times = {tile.config: float(i) for i, tile in enumerate(reversed(tiles))}  # the last config is fastest
    for kind in ("dkdv", "dq"):
        set_times(f"attention.{kind}", {tile.config: 1.0 for tile in attention._CONFIGS[kind]})
    set_times("attention.fwd", times)
    assert_pass(attention_checks(1, 2, 100, 64, torch.float16, device=DEVICE))
    assert set(asked["attention.fwd"]) == {tile.config for tile in tiles}
    assert _tuning._REGISTRY["attention.fwd"].tuner.best_config == tiles[-1].config
    # With dropout at D=64 the 128-row tile spills: it is pruned, and with one config left nothing is timed.
    set_times("attention.fwd", times)
    assert_pass(attention_checks(1, 1, 100, 64, torch.float16, dropout_p=0.1, device=DEVICE))
    allowed = attention.configs("fwd", 64, torch.float16, 100, dropout=True)
    assert asked["attention.fwd"] == ([] if len(allowed) == 1 else allowed)


def test_a_pin_overrides_the_autotuner(gpu_path):
    set_times, asked = gpu_path
    set_times("gelu_mlp.fwd", {c: 1.0 for c in gelu_mlp.CONFIGS})
    with kernels.use_configs({"gelu_mlp.fwd": gelu_mlp.CONFIGS[1]}):
        _, launches = gelu_mlp.forward_plan(torch.randn(8, 16), torch.randn(32, 16), None,
                                                   torch.randn(16, 32), None, keep_pre=False)
    assert all(kernel is _tuning._REGISTRY["gelu_mlp.fwd"].fn for kernel, *_ in launches)
    assert all(meta["BLOCK_M"] == gelu_mlp.CONFIGS[1].kwargs["BLOCK_M"] for *_, meta in launches)
    assert asked["gelu_mlp.fwd"] == []


def test_pins_name_known_kernels_and_their_own_configs_and_are_undone():
    with pytest.raises(ValueError, match="unknown kernel 'attention.bwd'"):
        with kernels.use_configs({"attention.bwd": attention._CONFIGS["dq"][0].config}):
            pass
    with pytest.raises(ValueError, match="is not one of attention.dq's configs"):
        with kernels.use_configs({"attention.dq": attention._CONFIGS["fwd"][0].config}):
            pass
    with kernels.use_configs({"attention.dq": attention._CONFIGS["dq"][1].config}):
        assert _tuning._pins == {"attention.dq": attention._CONFIGS["dq"][1].config}
    assert _tuning._pins == {}


def test_every_autotuned_kernel_is_registered_with_its_configs():
    assert set(_tuning.kernels()) == {"attention.fwd", "attention.dkdv", "attention.dq", "gelu_mlp.fwd",
                                      "gelu_mlp.dpre", "gelu_mlp.dweight", "linear_cross_entropy.logits",
                                      "linear_cross_entropy.dx", "linear_cross_entropy.dweight"}
    assert _tuning.kernels()["attention.dq"] == tuple(tile.config for tile in attention._CONFIGS["dq"])
    assert _tuning.describe(gelu_mlp.CONFIGS[0]) == "128x128x32 warps=8 stages=3"
