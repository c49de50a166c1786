"""The registry of ops: every op declares everything the tools read, once, and the tools read it."""
import importlib
from pathlib import Path

import pytest
import torch

import fastgpt_kernels
from fastgpt_kernels import _dispatch, _tuning, reference, registry

ROOT = Path(__file__).resolve().parents[1]
DECLARED = ("NAME", "inputs", "checks", "verify_cases", "unsupported", "BENCH_SHAPES", "bench_inputs", "step_dims", "DETERMINISM",
            "compile_specs", "sanitizer_calls", "fixed_configs")
needs_kernels = pytest.mark.skipif(_dispatch.NO_TRITON_REASON is not None, reason="needs Triton")


@pytest.mark.parametrize("op", registry.OPS)
def test_each_op_has_its_files_and_declares_everything_the_tools_read(op):
    declared = registry.declaration(op)
    assert [name for name in DECLARED if not hasattr(declared, name)] == []
    assert declared.NAME == op
    assert op in fastgpt_kernels.__all__ and callable(getattr(fastgpt_kernels, op))
    assert callable(getattr(reference, op))
    assert (ROOT / "fastgpt_kernels" / "ops" / f"{op}.py").is_file()
    assert (ROOT / "tests" / f"test_{op}.py").is_file()
    assert set(declared.BENCH_SHAPES) == {"tiny", "quick", "full", "gpt2"}
    assert declared.DETERMINISM and declared.verify_cases(False, torch.float16)
    tensors = declared.bench_inputs(declared.BENCH_SHAPES["tiny"], torch.float32, "cpu")
    assert getattr(fastgpt_kernels, op)(**tensors).dtype == torch.float32  # the public function takes them


def test_the_registry_names_the_ops_the_dispatcher_serves_and_refuses_others():
    assert _dispatch.OPS == registry.OPS
    assert [d.NAME for d in registry.declarations()] == list(registry.OPS)
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        registry.declaration("softmax")


@needs_kernels
def test_verify_benchmarks_and_the_gpu_report_take_every_op_from_the_registry():
    from bench import ops
    from bench.gpu_report import stages
    from fastgpt_kernels.tools import compile_report, verify

    every = set(registry.OPS)
    assert {case.op for case in verify.cases("cpu", [torch.float32])} == every
    assert all(set(shapes) == every for shapes in ops.SHAPES.values())
    assert {case.op for _, case, _ in stages.determinism_cases("tiny", torch.float32)} == every
    assert all(compile_report.compile_specs([op]) for op in registry.OPS)


@needs_kernels
def test_the_sanitizer_calls_pin_every_autotuned_config_and_cover_every_fixed_one():
    from bench.gpu_report import stages

    calls = stages.sanitizer_calls(torch.float16)
    pinned = {(name, _tuning.describe(config)) for _, pins, _, _ in calls for name, config in pins.items()}
    every = {(name, _tuning.describe(config)) for name, configs in _tuning.candidate_configs().items()
             for config in configs}
    assert every <= pinned
    covered = {label for _, _, covers, _ in calls for label in covers}
    fixed = {label for declared in registry.declarations() for label in declared.fixed_configs()}
    assert fixed and fixed == covered


@needs_kernels
def test_layer_norm_widths_select_every_launch_config():
    from fastgpt_kernels.ops import layer_norm

    widths = registry.declaration("layer_norm").widths()
    assert set(widths) == set(layer_norm.launch_configs())
    assert all(layer_norm.block_config(w) == config for config, w in widths.items())


def test_a_fifth_op_reaches_the_tools_through_its_declaration_alone(monkeypatch):
    """A stand-in op declared in the registry (a copy of LayerNorm's declaration under another name,
    served by LayerNorm's public function) shows up in verify's grid and the GPU report's
    determinism cases, which read nothing else; the benchmarks time it against the reference."""
    from bench import ops
    from bench.gpu_report import stages
    from fastgpt_kernels.tools import verify

    fifth = importlib.util.module_from_spec(importlib.util.find_spec("fastgpt_kernels.registry.layer_norm"))
    fifth.__spec__.loader.exec_module(fifth)
    fifth.NAME = "fifth_op"
    fifth.DETERMINISM = (("fifth_op", {"eps": 1e-3}),)
    monkeypatch.setattr(fastgpt_kernels, "fifth_op", fastgpt_kernels.layer_norm, raising=False)
    monkeypatch.setattr(registry, "declarations", lambda: [fifth])
    monkeypatch.setattr(registry, "declaration", lambda op: fifth)
    assert {case.op for case in verify.cases("cpu", [torch.float32])} == {"fifth_op"}
    [(label, case, fn)] = stages.determinism_cases("tiny", torch.float32)
    assert (label, case.op, case.dims) == ("fifth_op", "fifth_op", fifth.BENCH_SHAPES["tiny"])
    assert fn.keywords == {"eps": 1e-3}
    assert ops.providers("fifth_op") == ("reference", "triton")  # no plain-PyTorch baseline of its own
    assert ops.flops(ops.OpCase("fifth_op", case.dims), "forward") is None
