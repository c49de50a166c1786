"""The installed package as a user meets it: run with a virtual environment's Python that holds the
fastgpt wheel and transformers (which brings Hugging Face's ``kernels``), from a directory outside
the checkout. Exits non-zero on the first thing that does not work.

Checks: no installed file belongs to two distributions (their RECORDs compared); fastgpt,
fastgpt_kernels, transformers and Hugging Face's kernels import side by side, each with its own API,
fastgpt's from site-packages; the installed commands train a tiny model, sample from it, prepare a
corpus and list verify's cases, score HellaSwag-shaped items, and say how to install the extras
(pyarrow, matplotlib) they lack; a Triton kernel runs (in the interpreter) and matches PyTorch; a
model fastgpt saves loads in transformers with the same logits.
"""
import collections
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*argv: str, env: dict | None = None, status: int = 0, says: str = "") -> str:
    """Run a command; exit unless it ends with ``status`` and its output holds ``says``."""
    shown = [a if "\n" not in a else "<" + a.strip().splitlines()[0] + " ...>" for a in argv]
    print("$", " ".join(shown), flush=True)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    out = (result.stdout + result.stderr).strip()
    print("\n".join(out.splitlines()[-6:]), flush=True)
    if result.returncode != status or says not in out:
        sys.exit(f"FAILED (exit {result.returncode}, expected {status}{f' saying {says!r}' if says else ''}): "
                 f"{' '.join(argv)}\n{out[-4000:]}")
    return result.stdout


def no_file_has_two_owners() -> None:
    owners = collections.defaultdict(set)
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            owners[os.path.normpath(str(file))].add(dist.metadata["Name"])
    shared = {path: sorted(names) for path, names in owners.items() if len(names) > 1}
    if shared:
        sys.exit("FAILED: files installed by two distributions: " + "; ".join(f"{p} ({', '.join(n)})"
                                                                             for p, n in sorted(shared.items())))
    tops = {str(f).split("/")[0] for f in importlib.metadata.distribution("fastgpt").files}
    if "kernels" in tops:
        sys.exit("FAILED: fastgpt installs a top-level kernels package")
    print(f"{len(owners)} installed files, none owned twice; fastgpt installs {sorted(tops)}")


IMPORTS = """
import sys, fastgpt, fastgpt_kernels, kernels, transformers
from transformers import GPT2LMHeadModel
assert callable(kernels.get_kernel), "Hugging Face's kernels lost its API"
assert fastgpt_kernels.BACKENDS == ("auto", "triton", "torch")
for module in (fastgpt, fastgpt_kernels, kernels):
    assert "site-packages" in module.__file__, module.__file__
print("transformers", transformers.__version__, "| kernels", kernels.__file__,
      "| fastgpt_kernels", fastgpt_kernels.__file__)
"""

KERNEL_CALL = """
import torch, fastgpt_kernels
torch.manual_seed(0)
x = torch.randn(3, 37, 96, requires_grad=True)
w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
with fastgpt_kernels.use_backend("triton"):  # raises instead of falling back
    y = fastgpt_kernels.layer_norm(x, w, b)
y.square().sum().backward()
grads = [t.grad.clone() for t in (x, w, b)]
for t in (x, w, b):
    t.grad = None
expected = torch.nn.functional.layer_norm(x, (96,), w, b)
expected.square().sum().backward()
torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
for got, t in zip(grads, (x, w, b)):
    torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-4)
print("layer_norm on the Triton kernel (interpreter): forward and gradients match F.layer_norm")
"""

TO_TRANSFORMERS = """
import torch, transformers
from fastgpt.sample import load_model
model, _ = load_model("out", "cpu")
model.save_pretrained("hf")
hf = transformers.GPT2LMHeadModel.from_pretrained("hf").eval()
idx = torch.randint(0, model.config.vocab_size, (2, 12))
with torch.no_grad():
    ours, _ = model.eval()(idx)  # the last position's logits, (B, 1, V)
    theirs = hf(idx).logits[:, -1:]
torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
print("the trained model saved by fastgpt gives the same logits in transformers.GPT2LMHeadModel")
"""


def main() -> None:
    if Path.cwd().resolve() == Path(__file__).resolve().parents[1]:
        sys.exit("run this from a directory outside the checkout")
    no_file_has_two_owners()
    run(sys.executable, "-c", IMPORTS)
    Path("corpus.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                          for i in range(400)))
    run(str(BIN / "fastgpt-train"), "--dataset", "corpus.txt", "--tokenizer", "char", "--n_layer", "1",
        "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4", "--max_iters", "6",
        "--eval_interval", "3", "--eval_iters", "1", "--log_interval", "3", "--sample_tokens", "16",
        "--device", "cpu", "--dtype", "float32")
    run(str(BIN / "fastgpt-sample"), "out", "--prompt", "the ", "--max_new_tokens", "12", "--device", "cpu")
    run(sys.executable, "-c", TO_TRANSFORMERS)
    run(str(BIN / "fastgpt-prepare"), "corpus.txt", "--out", "shards", "--tokenizer", "gpt2", "--workers", "2")
    if importlib.util.find_spec("pyarrow") is None:  # an extra: without it, the command says so
        Path("rows.parquet").write_bytes(b"PAR1")
        run(str(BIN / "fastgpt-prepare"), "rows.parquet", "--out", "rows", status=2,
            says="pip install 'fastgpt[parquet]'")
    Path("hellaswag.jsonl").write_text("".join(
        json.dumps({"ctx": f"line {i}: the quick", "endings": [" brown fox", " lazy dog", " over the", " jumps"],
                    "label": i % 4}) + "\n" for i in range(6)))
    run(sys.executable, "-m", "fastgpt.eval", "hellaswag", "hellaswag.jsonl", "out", "--device", "cpu",
        says="over 6 examples")
    if importlib.util.find_spec("matplotlib") is None:  # an extra too
        run(sys.executable, "-m", "fastgpt.plot", "out", status=2, says="pip install")
    else:
        run(sys.executable, "-m", "fastgpt.plot", "out", says="metrics.png")
    run(str(BIN / "fastgpt-verify"), "--dry-run")
    run(sys.executable, "-c", KERNEL_CALL, env={"TRITON_INTERPRET": "1"})
    run(str(BIN / "fastgpt-compile-report"), "--help")
    print("installed fastgpt: every check passed")


if __name__ == "__main__":
    main()
