"""``python -m bench.gpu_report``: everything a GPU machine can show about the kernels, in a few minutes.

Stages, in order, each in its own child process (``python -m bench.gpu_report --stage NAME``) with its
own time budget, so that a crash, a hang or a failure of one is reported and the next one still runs:

``env``          versions (Python, torch, triton, numpy, CUDA runtime and driver), the GPU (name,
                 compute capability, memory, multiprocessors), whether compute-sanitizer is
                 installed, ``nvidia-smi``'s output.
``warmup``       every kernel config the verify, determinism, ops and train stages launch (each
                 config the autotuner will time), compiled without running by
                 :data:`stages.WARMUP_WORKERS` processes side by side into Triton's disk cache, so that a
                 cold cache costs the later stages lookups, not their budgets. Every stage records
                 how many kernels it compiled and loaded, and the seconds it spent on them.
``verify``       :mod:`fastgpt_kernels.tools.verify` at GPU shapes in every dtype: every kernel output and
                 gradient against float64 by the 2x-PyTorch rule; every failing row is kept.
``tests``        the kernel test files (:data:`stages.TEST_FILES`) under pytest on the GPU.
``determinism``  every op's backward, run twice with the same inputs and seed on the ``triton``
                 backend at GPT-2 shapes: every gradient must be bitwise equal.
``ops``          each op, forward and forward+backward, timed with CUDA events over
                 :data:`stages.OPS_ITERATIONS` calls back to back by :func:`bench.ops.run` at GPT-2 shapes
                 (``ops.SHAPES["gpt2"]``): the naive ops, PyTorch's own (SDPA with the installed
                 torch's default backends, ``F.layer_norm``, linear + GELU + linear) and the Triton
                 kernels, each with its fraction of the GPU's roofline.
``train``        a GPT-2 124M training step (:class:`fastgpt.model.GPTConfig`'s defaults, T=1024,
                 AdamW) on the ``torch``, ``triton`` and ``auto`` backends and in plain PyTorch
                 (eager), batch 16 and 4, dropout 0 and 0.1 (:func:`bench.train_step.time_steps`),
                 the config every autotuned kernel ran (tuned in this run or read from the disk
                 cache), and which side ``auto`` chose per op and shape class, with both timings.
``compiled``     plain PyTorch's GPT-2 under ``torch.compile`` against the Triton kernels (eager),
                 batch 16, no dropout.
``sanitizer``    ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` over one small
                 forward and backward of every launch config of every kernel (the
                 ``sanitizer-target`` stage, run as the sanitizer's child); skipped, saying why,
                 where compute-sanitizer or a GPU is missing.

Results go to ``--out`` (default ``out/gpu_report/``): ``report.json`` (per stage: status ok,
failed, timeout or skipped, seconds, figures, the tail of its output), ``report.md`` (tables to paste
into a README, naming the GPU, the versions and the date) and ``logs/`` (each stage's whole output).
Both files are rewritten after every stage. The default budgets add up to under ten minutes
(:data:`stages.STAGES`); ``--budget-scale`` multiplies them.

``--tiny`` runs the same stages at tiny shapes and budgets; without a GPU (a minute or two on a
2-core CPU) the kernels run in Triton's interpreter on CPU tensors. Its figures mean nothing; it
checks that the report itself works.

The package: :mod:`~bench.gpu_report.runner` (the command, the parent process, the files),
:mod:`~bench.gpu_report.stages` (what each stage does, in its child), :mod:`~bench.gpu_report.children`
(process groups: started, run, ended whole) and :mod:`~bench.gpu_report.report` (the Markdown).
"""
