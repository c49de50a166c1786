"""fastgpt_kernels._tuning: the one place that picks each autotuned kernel's launch config, pins included.

On a GPU the config comes from Triton's autotuner, which times the configs the op allows. That
path runs here in Triton's interpreter, with the autotuner's timer replaced by made-up timings
(the interpreter cannot time anything): keys, pruning, the choice and the launch are Triton's own.
"""
import json
import textwrap
from pathlib import Path

import pytest
import torch

import fastgpt_kernels
from conftest import DEVICE
from fastgpt_kernels import _dispatch, _io, _tuning
from fastgpt_kernels.ops import attention, gelu_mlp
from fastgpt_kernels.registry.attention import checks as attention_checks
from fastgpt_kernels.registry.gelu_mlp import checks as gelu_mlp_checks
from fastgpt_kernels.registry.linear_cross_entropy import checks as linear_cross_entropy_checks
from fastgpt_kernels.tools.checking import assert_pass

pytestmark = pytest.mark.skipif(not _dispatch.INTERPRETED, reason="runs the GPU path in Triton's interpreter")


@pytest.fixture
def gpu_path(monkeypatch):
    """Take the path a GPU takes; each tuner "measures" the given tile sizes' made-up times.

    Yields ``set_times(name, {config: seconds})``; the times actually asked for are recorded in
    ``asked[name]``.
    """
    monkeypatch.setattr(_tuning, "_autotuner_can_time", lambda: True)
    for tunable in _tuning.tunables().values():  # no choices from earlier tests
        monkeypatch.setattr(tunable, "chosen", {})
    asked = {}

    def set_times(name, times):
        tuner = _tuning.tunables()[name].tuner
        tuner.cache.clear()
        asked[name] = []

        def bench(*args, config, **meta):
            asked[name].append(config)
            return [times[config]] * 3  # the median and the 20th and 80th percentiles

        monkeypatch.setattr(tuner, "_bench", bench)

    yield set_times, asked
    for name in asked:
        _tuning.tunables()[name].tuner.cache.clear()


def test_the_autotuner_times_every_config_and_launches_the_fastest(gpu_path):
    set_times, asked = gpu_path
    fastest = gelu_mlp.CONFIGS[2]
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        set_times(name, {c: 1.0 if c == fastest else 2.0 for c in gelu_mlp.CONFIGS})
    assert_pass(gelu_mlp_checks(70, 48, 200, torch.float16, device=DEVICE))
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        tuner = _tuning.tunables()[name].tuner
        assert set(asked[name]) == set(gelu_mlp.CONFIGS)
        assert tuner.best_config == fastest
        assert fastest in tuner.cache.values()


@pytest.fixture
def timing_runs_the_kernels(monkeypatch):
    """The GPU path with a timer that runs each timed config three times, as a real timer runs it
    many times (the autotuner's hooks around each run included), and times every config equal."""
    monkeypatch.setattr(_tuning, "_autotuner_can_time", lambda: True)

    def run_three_times(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0] * len(quantiles)

    for tunable in _tuning.tunables().values():
        tunable.tuner.cache.clear()
        monkeypatch.setattr(tunable, "chosen", {})
        monkeypatch.setattr(tunable.tuner, "_do_bench", run_three_times)
    yield
    for tunable in _tuning.tunables().values():
        tunable.tuner.cache.clear()


@pytest.mark.parametrize("case", ["gelu_mlp", "attention", "linear_cross_entropy"])
def test_timing_a_tuning_launch_leaves_the_results_as_one_launch_would(timing_runs_the_kernels, case):
    """Timing launches every config several times; outputs a kernel adds into (the fused loss's
    weight gradient, accumulated over chunks of rows) must come out as after one launch."""
    if case == "gelu_mlp":
        assert_pass(gelu_mlp_checks(70, 48, 200, torch.float16, device=DEVICE))
    elif case == "attention":
        assert_pass(attention_checks(1, 2, 80, 32, torch.float16, device=DEVICE))
    else:
        from fastgpt_kernels import reference

        # several chunks of rows, so the weight gradient is added into chunk after chunk
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reference, "MAX_CHUNK_LOGITS", 80 * 300)
            assert_pass(linear_cross_entropy_checks(200, 48, 300, torch.float16, device=DEVICE))
    assert any(tunable.chosen for tunable in _tuning.tunables().values())


def test_the_autotuner_times_only_the_configs_the_op_allows(gpu_path):
    set_times, asked = gpu_path
    tiles = attention.TILES["fwd"]
    times = {tile.config: float(i) for i, tile in enumerate(reversed(tiles))}  # the last config is fastest
    for kind in ("dkdv", "dq"):
        set_times(f"attention.{kind}", {tile.config: 1.0 for tile in attention.TILES[kind]})
    set_times("attention.fwd", times)
    assert_pass(attention_checks(1, 2, 100, 64, torch.float16, device=DEVICE))
    assert set(asked["attention.fwd"]) == {tile.config for tile in tiles}
    assert _tuning.tunables()["attention.fwd"].tuner.best_config == tiles[-1].config
    # With dropout at D=64 the 128-row tile spills: it is pruned, and with one config left nothing is timed.
    set_times("attention.fwd", times)
    assert_pass(attention_checks(1, 1, 100, 64, torch.float16, dropout_p=0.1, device=DEVICE))
    allowed = attention.configs("fwd", 64, torch.float16, 100, dropout=True)
    assert asked["attention.fwd"] == ([] if len(allowed) == 1 else list(allowed))


def test_a_pin_overrides_the_autotuner(gpu_path):
    set_times, asked = gpu_path
    set_times("gelu_mlp.fwd", {c: 1.0 for c in gelu_mlp.CONFIGS})
    with fastgpt_kernels.use_configs({"gelu_mlp.fwd": gelu_mlp.CONFIGS[1]}):
        _, launches = gelu_mlp.forward_plan(torch.randn(8, 16), torch.randn(32, 16), None,
                                                   torch.randn(16, 32), None, keep_pre=False)
    assert all(kernel is _tuning.tunables()["gelu_mlp.fwd"].fn for kernel, *_ in launches)
    assert all(meta["BLOCK_M"] == gelu_mlp.CONFIGS[1].kwargs["BLOCK_M"] for *_, meta in launches)
    assert asked["gelu_mlp.fwd"] == []


def test_pins_name_known_kernels_and_their_own_configs_and_are_undone():
    with pytest.raises(ValueError, match="unknown kernel 'attention.bwd'"):
        with fastgpt_kernels.use_configs({"attention.bwd": attention.TILES["dq"][0].config}):
            pass
    with pytest.raises(ValueError, match="is not one of attention.dq's configs"):
        with fastgpt_kernels.use_configs({"attention.dq": attention.TILES["fwd"][0].config}):
            pass
    with fastgpt_kernels.use_configs({"attention.dq": attention.TILES["dq"][1].config}):
        assert _tuning._pins == {"attention.dq": attention.TILES["dq"][1].config}
    assert _tuning._pins == {}


def test_every_autotuned_kernel_is_registered_with_its_configs():
    assert set(_tuning.candidate_configs()) == {
        "attention.fwd", "attention.dkdv", "attention.dq", "gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight",
        "linear_cross_entropy.logits", "linear_cross_entropy.dx", "linear_cross_entropy.dweight"}
    assert _tuning.candidate_configs()["attention.dq"] == tuple(tile.config for tile in attention.TILES["dq"])
    assert _tuning.describe(gelu_mlp.CONFIGS[0]) == "128x128x32 warps=8 stages=3"


def test_launches_over_a_few_tokens_take_the_smallest_tiles_untimed(gpu_path):
    set_times, asked = gpu_path
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        set_times(name, {c: 1.0 for c in gelu_mlp.CONFIGS})
    assert_pass(gelu_mlp_checks(_tuning.SMALL_TOKENS, 48, 200, torch.float16, device=DEVICE))
    assert all(asked[name] == [] for name in asked)


def test_generation_tunes_for_the_prompt_and_never_after_its_first_token(gpu_path):
    """With the cache every step after the prompt runs one token: few tokens, never timed."""
    from fastgpt.model import GPT, GPTConfig

    set_times, asked = gpu_path
    for name, configs in _tuning.candidate_configs().items():
        set_times(name, {c: 1.0 for c in configs})
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=96, n_layer=1, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(50, (1, 80))  # more than SMALL_TOKENS: the prompt's launches are tuned
    model.generate(prompt, 1)
    tuned_by_the_prompt = {name: len(configs) for name, configs in asked.items()}
    assert sum(tuned_by_the_prompt.values()) > 0
    model.generate(prompt, 8)
    assert {name: len(configs) for name, configs in asked.items()} == tuned_by_the_prompt


@pytest.mark.slow
def test_choices_are_kept_on_disk_and_a_second_process_does_not_tune_again(tmp_path):
    """Two processes share one cache directory: the first times the configs, the second reads its choices."""
    from conftest import run_python

    script = f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest
        os.environ["FASTGPT_AUTOTUNE_CACHE"] = {str(tmp_path)!r}  # (conftest turns the cache off)
        import fastgpt_kernels
        from fastgpt_kernels import _tuning
        from fastgpt_kernels.ops import gelu_mlp
        _tuning._autotuner_can_time = lambda: True  # the path a GPU takes (conftest runs the interpreter)
        asked = []
        tuner = _tuning.tunables()["gelu_mlp.fwd"].tuner
        tuner._bench = lambda *args, config, **meta: asked.append(config) or [float(gelu_mlp.CONFIGS.index(config) + 1)] * 3
        with fastgpt_kernels.use_configs({{"gelu_mlp.dpre": gelu_mlp.CONFIGS[0], "gelu_mlp.dweight": gelu_mlp.CONFIGS[0]}}):
            x, w1, w2 = torch.randn(100, 16).half(), torch.randn(64, 16).half(), torch.randn(16, 64).half()
            fastgpt_kernels.gelu_mlp(x, w1, None, w2, None)
            fastgpt_kernels.gelu_mlp(torch.randn(120, 16).half(), w1, None, w2, None)  # the same bucket: no tuning
        print(len(asked), _tuning.tuned_configs())
    """
    env = dict(TRITON_INTERPRET=None)
    first = run_python(script, **env)
    assert first.returncode == 0, first.stderr
    # The two GEMMs of the forward (fc and proj) each time every config once; the second call's
    # token count falls in the same bucket (128).
    assert first.stdout.startswith(f"{2 * len(gelu_mlp.CONFIGS)} [('gelu_mlp.fwd', (128, 64, 16")
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and "triton-" in files[0].name
    second = run_python(script, **env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("0 [('gelu_mlp.fwd', (128, 64, 16")  # read from disk, not timed
    assert "128x128x32 warps=8 stages=3" in second.stdout


def test_host_side_rounding_agrees_with_triton():
    """The ops' plans round with fastgpt_kernels.ops._common's cdiv and next_power_of_2 (plain Python, no
    constexpr_function call): the same numbers as Triton's."""
    import triton

    from fastgpt_kernels.ops._common import cdiv, next_power_of_2

    for n in [*range(0, 300), 1023, 1024, 1025, 2**31 - 1, 2**31, 2**40 + 3]:
        assert next_power_of_2(max(n, 1)) == triton.next_power_of_2(max(n, 1)), n
        for d in (1, 3, 16, 128):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert next_power_of_2(0) == 1


def test_a_split_k_weight_gradient_times_and_launches_only_the_configs_allowed_there(gpu_path):
    """The config left out under split-K (it spills there) is the fastest without a split: the split
    launch must not inherit it from the autotuner's memory, time it, or take it from the disk cache."""
    from fastgpt_kernels.ops._common import run

    set_times, asked = gpu_path
    left_out = next(c for c in gelu_mlp.CONFIGS if c not in gelu_mlp.SPLIT_CONFIGS)
    for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
        set_times(name, {c: 1.0 if c is left_out else 2.0 for c in gelu_mlp.CONFIGS})
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(shape, generator=gen).half() for shape in ((96, 32), (64, 32), (32, 64)))
    out, pre = run(gelu_mlp.forward_plan(x, w1, None, w2, None, keep_pre=True))
    dout = torch.randn(out.shape, generator=gen).half()
    tunable = _tuning.tunables()["gelu_mlp.dweight"]

    def backward(split):
        asked["gelu_mlp.dweight"].clear()
        _, launches = gelu_mlp.backward_plan(dout, x, w1, w2, pre, False, False, split=split)
        run((None, launches))
        return dict(tunable.chosen)

    backward(1)
    assert set(tunable.chosen.values()) == {left_out}  # without a split it is allowed, and the fastest
    chosen = backward(2)
    split_keys = [key for key in chosen if 2 in key[4:]]  # (M, N, bucket, dtype, *flags): SPLIT_K=2 among the flags
    assert asked["gelu_mlp.dweight"] and left_out not in asked["gelu_mlp.dweight"]
    assert split_keys and all(chosen[key] in gelu_mlp.SPLIT_CONFIGS for key in split_keys)
    # A choice the disk held that the split forbids (an older cache, a hand-edited file) is timed again.
    for key in split_keys:
        tunable.chosen[key] = left_out
    backward(2)
    assert asked["gelu_mlp.dweight"] and all(tunable.chosen[key] in gelu_mlp.SPLIT_CONFIGS for key in split_keys)


def test_attention_tunes_apart_for_batches_of_other_sizes(gpu_path):
    """A generation at B=1 or a check at B=4 must not decide the tile of training at B=16: the launch
    key holds the batch x heads bucket."""
    set_times, asked = gpu_path
    for kind in ("fwd", "dkdv", "dq"):
        set_times(f"attention.{kind}", {tile.config: 1.0 for tile in attention.TILES[kind]})
    keys = []
    for batch in (1, 4, 16):
        q = torch.randn(batch, 2, 80, 32).half()
        with fastgpt_kernels.use_backend("triton"):
            fastgpt_kernels.attention(q, q, q)
        keys.append(set(_tuning.tunables()["attention.fwd"].chosen))
    assert len(keys[0]) == 1 and len(keys[1]) == 2 and len(keys[2]) == 3


def _cache_script(tmp_path, setup: str) -> str:
    return f"""
        import os, sys, warnings, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest
        os.environ["FASTGPT_AUTOTUNE_CACHE"] = {str(tmp_path / "cache")!r}
        import fastgpt_kernels
        from fastgpt_kernels import _tuning
        from fastgpt_kernels.ops import gelu_mlp
        _tuning._autotuner_can_time = lambda: True
        for name in ("gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"):
            _tuning.tunables()[name].tuner._bench = lambda *args, config, **meta: [float(gelu_mlp.CONFIGS.index(config) + 1)] * 3
{textwrap.indent(textwrap.dedent(setup), " " * 8)}
        warnings.simplefilter("always")
        x = torch.randn(100, 16).half().requires_grad_()
        w1, w2 = torch.randn(64, 16).half().requires_grad_(), torch.randn(16, 64).half().requires_grad_()
        fastgpt_kernels.gelu_mlp(x, w1, None, w2, None).sum().backward()
        fastgpt_kernels.gelu_mlp(x, w1, None, w2, None).sum().backward()
        print("choices", len(_tuning.tuned_configs()))
    """


@pytest.mark.slow
def test_an_unwritable_cache_keeps_the_choices_in_memory_with_one_warning(tmp_path):
    from conftest import run_python

    (tmp_path / "cache").write_text("a file where the directory should be")
    result = run_python(_cache_script(tmp_path, ""), TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("autotuning cache cannot be written") == 1, result.stderr
    assert "choices 5" in result.stdout  # fc and proj forward, dpre, both weight gradients: all tuned


@pytest.mark.parametrize("content", ['[1, 2, 3]', '{"gelu_mlp.fwd": [1]}', '{"gelu_mlp.fwd": {"source": 1}}',
                                     '{"gelu_mlp.fwd": {"source": SOURCE, "choices": [[1, 2]]}}',
                                     '{"gelu_mlp.fwd": {"source": SOURCE, "choices": [[[128], "0", "x"]]}}',
                                     "{not json"])
@pytest.mark.slow
def test_a_cache_file_of_the_wrong_shape_is_tuned_again_and_rewritten(tmp_path, content):
    from conftest import run_python

    setup = f"""
        path = _tuning.cache_file()
        path.parent.mkdir(parents=True)
        source = _tuning._source_key(_tuning.tunables()["gelu_mlp.fwd"])  # the kernel's own: its choices are read
        path.write_text({content!r}.replace("SOURCE", '"' + source + '"'))
    """
    result = run_python(_cache_script(tmp_path, setup), TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr
    assert "choices 5" in result.stdout
    [written] = (tmp_path / "cache").glob("*.json")
    assert set(json.loads(written.read_text())) == {"gelu_mlp.fwd", "gelu_mlp.dpre", "gelu_mlp.dweight"}


def test_without_a_home_directory_the_choices_stay_in_memory(monkeypatch):
    monkeypatch.delenv(_io.CACHE_DIR_ENV, raising=False)
    monkeypatch.setattr(_io, "_unwritable", [])

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    _io.cache_directory.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="autotuning cache cannot be written .no home directory"):
            assert _tuning.cache_file() is None
    finally:
        _io.cache_directory.cache_clear()
