"""The GPU report's Markdown (``report.md``) and its one-line summaries, from ``report.json``'s figures."""
from __future__ import annotations

from bench.gpu_report.stages import STAGES


def summary(name: str, entry: dict) -> str:
    """One line on a stage's outcome, for the progress line and the table of stages."""
    f = entry["figures"]
    if entry["status"] == "skipped" or (entry["reason"] and entry["status"] != "ok" and not f):
        return entry["reason"] or ""
    text = {
        "env": lambda: (f"{(f.get('gpu') or {}).get('name', 'no GPU')}, torch {f.get('torch')}, "
                        f"triton {f.get('triton')}"),
        "warmup": lambda: (lambda w: f"{w.get('asked', 0)} kernels asked for by {w.get('workers', 0)} workers: "
                                     f"{w.get('compiled', 0)} compiled, {w.get('from_disk', 0)} from the disk cache, "
                                     f"{w.get('seconds', 0):.0f} s of compiling")(f.get("warmup", {})),
        "verify": lambda: (f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('skipped', 0)} cases "
                           f"skipped, {f.get('errors', 0)} cases crashed"),
        "tests": lambda: (f"{f.get('passed', 0)} passed, {f.get('failed', 0)} failed, {f.get('error', 0)} errors, "
                          f"{f.get('skipped', 0)} skipped"),
        "determinism": lambda: (f"{sum(r['equal'] for r in f.get('rows', []))} of {len(f.get('rows', []))} "
                                f"bitwise equal"),
        "ops": lambda: ", ".join(f"{r['op']} {r['pass']} {r['ratio']:.2f}x" for r in f.get("ratios", []))
                       or "no Triton timings",
        "train": lambda: ", ".join(f"B={r['batch']} p={r['dropout']} {r.get('variant', 'triton')} {r['speedup']:.2f}x "
                                   f"{r['against']}" for r in f.get("ratios", []))
                         or f"{len(f.get('rows', []))} variants timed",
        "compiled": lambda: ", ".join(f"triton {r['speedup']:.2f}x plain compiled" for r in f.get("ratios", []))
                            or f"{len(f.get('rows', []))} variants timed",
        "sanitizer": lambda: ", ".join(f"{tool} {t['errors']} errors" for tool, t in f.get("tools", {}).items()),
    }[name]()
    return text + (f" ({entry['reason']})" if entry["reason"] and entry["status"] != "ok" else "")


def _fraction(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def _header(report: dict) -> list[str]:
    env = report["stages"].get("env", {}).get("figures") or {}
    machine = report["machine"]
    gpu = env.get("gpu")
    where = (f"{gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB, {gpu['sms']} SMs)"
             if gpu else (machine["gpu"] or f"no GPU ({machine['cpu']}, kernels in Triton's interpreter)"))
    versions = [f"Python {machine['python']}", f"torch {machine['torch']}", f"triton {machine['triton']}"]
    if env:
        versions.append(f"numpy {env['numpy']}")
        if env["cuda_runtime"]:
            versions.append(f"CUDA runtime {env['cuda_runtime']}")
        if env["driver"]:
            versions.append(f"NVIDIA driver {env['driver']} (CUDA {env['driver_cuda']})")
    lines = [f"# fastgpt GPU report: {where}", "", f"{report['date']}; `{report['command']}`", "",
             ", ".join(versions) + "."]
    if report["tiny"]:
        lines += ["", "**Tiny run (`--tiny`): tiny shapes and budgets to check that the report works; "
                      "its figures mean nothing.**"]
    return lines


def _section_env(f: dict) -> list[str]:
    return [f"compute-sanitizer: {f.get('compute_sanitizer') or 'not installed'}; kernels in Triton's interpreter: "
            f"{f.get('kernels_interpreted')}; SDPA backends enabled: {', '.join(f.get('sdpa_backends') or []) or '-'}",
            "", "```", (f.get("nvidia_smi") or "").rstrip(), "```"]


def _section_warmup(f: dict) -> list[str]:
    failed = (f.get("warmup") or {}).get("failed") or []
    return ["Every kernel the verify, determinism, ops and train stages launch (each config the autotuner "
            "will time), compiled ahead of them by workers side by side into Triton's disk cache; the stages' "
            "own compile counts are in the table of stages."] + (["", "```", *failed, "```"] if failed else [])


def _compiles(entry: dict) -> str:
    c = entry["figures"].get("compiles")
    return "-" if not c else f"{c['compiled']} + {c['from_disk']} cached, {c['seconds']:.0f} s"


def _section_verify(f: dict) -> list[str]:
    lines = [f"{f.get('passed', 0)} tensors passed, {f.get('failed', 0)} failed; {f.get('skipped', 0)} cases skipped "
             f"(the kernels do not take them), {f.get('errors', 0)} crashed."]
    bad = f.get("failures", []) + f.get("error_cases", [])
    return lines + (["", "```", *bad, "```"] if bad else [])


def _section_tests(f: dict) -> list[str]:
    lines = [f"`{f.get('command', '')}`: {f.get('passed', 0)} passed, {f.get('failed', 0)} failed, "
             f"{f.get('error', 0)} errors, {f.get('skipped', 0)} skipped."]
    return lines + (["", *[f"- `{t}`" for t in f["failing"]]] if f.get("failing") else [])


def _section_determinism(f: dict) -> list[str]:
    lines = ["| op | shape | dtype | tensors | bitwise equal |", "|---|---|---|---|---|"]
    for r in f.get("rows", []):
        verdict = "yes" if r["equal"] else "NO: " + "; ".join(f"{k} {v}" for k, v in r["differences"].items())
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {', '.join(r['tensors'])} | {verdict} |")
    return lines


def _section_ops(f: dict) -> list[str]:
    from bench import ops

    rows = f.get("rows", [])
    if not rows:
        return []
    times = {(r["op"], r["pass"], r["provider"]): r for r in rows}
    clock = "CUDA events" if f["device"] == "cuda" else "wall clock"
    lines = [f"{f['dtype']}, median of {f['rounds']} rounds of {f.get('iterations', 1)} calls back to back, "
             f"{clock}; reference: PyTorch's own ops (SDPA with torch's default backend, F.layer_norm, linear + GELU "
             "+ linear, the chunked loss); baseline: the lecture's naive ops, and for the loss the unfused F.linear + "
             "F.cross_entropy; roofline: the time of the op's FLOPs (LayerNorm: bytes) at the data sheet's peak "
             "over the time measured.", "",
             "| op | shape | pass | baseline ms | reference ms | triton ms | reference / triton | reference roofline "
             "| triton roofline | triton peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (op, pass_name, provider), r in times.items():
        if provider != "reference":
            continue
        cells = []
        for p in (ops.baseline(op), "reference", "triton"):
            row = times.get((op, pass_name, p), {})
            cells.append(f"{row['time_s'] * 1e3:.3f}" if row.get("status") == "measured" else row.get("status", "-"))
        triton_row = times.get((op, pass_name, "triton"), {})
        ratio = (f"{r['time_s'] / triton_row['time_s']:.2f}x" if triton_row.get("status") == "measured" else "-")
        lines.append(f"| {op} | {r['shape']} | {pass_name} | {' | '.join(cells)} | {ratio} | "
                     f"{_fraction(r.get('roofline'))} | {_fraction(triton_row.get('roofline'))} | "
                     f"{_mib(triton_row.get('peak_memory_bytes'))} |")
    return lines


def _section_train(f: dict) -> list[str]:
    rows = f.get("rows", [])
    if not rows:
        return []
    shape = f["shape"]
    lines = [f"{f['precision']} autocast, {shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} wide, "
             f"vocabulary {shape['vocab_size']}, T={rows[0]['context']}, AdamW; variants run one after another in "
             "one process, in this order (the first step compiles and autotunes what earlier ones have not).", "",
             "| B | dropout | backend | tokens/s | step ms | first step s | peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['dropout']} | {r['backend']} | {r['tokens_per_s']:.0f} | "
                     f"{r['time_s'] * 1e3:.1f} | {r['first_step_s']:.2f} | {_mib(r['peak_memory_bytes'])} |")
    if f.get("ratios"):
        lines += ["", "| B | dropout | variant | against | tokens/s ratio | peak memory ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['dropout']} | {r.get('variant', 'triton')} | {r['against']} | "
                  f"{r['speedup']:.2f}x | "
                  f"{'-' if r['memory_ratio'] is None else format(r['memory_ratio'], '.2f')} |" for r in f["ratios"]]
    if f.get("decisions"):
        lines += ["", "What `auto` decided (each op's first call in a shape class races the kernel against PyTorch, "
                  "forward and backward; PyTorch serves only when faster by more than 3%):", "",
                  "| op | shape class | serves | why | kernel ms | PyTorch ms | PyTorch / kernel |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {d['op']} | {d['shape_class']} | {'kernel' if d['served'] == 'kernel' else 'PyTorch'} | "
                  f"{d['why']} | {_ms(d['kernel_ms'])} | {_ms(d['torch_ms'])} | "
                  f"{'-' if d['speedup'] is None else format(d['speedup'], '.2f') + 'x'} |" for d in f["decisions"]]
    chosen = [(name, key, config) for name, keys in (f.get("autotuned") or {}).items() for key, config in keys.items()]
    if chosen:
        lines += ["", "Configs Triton's autotuner chose:", "", "| kernel | key | config |", "|---|---|---|"]
        lines += [f"| {name} | `{key}` | {config} |" for name, key, config in chosen]
    elif "autotuned" in f:
        lines += ["", "Nothing was autotuned (Triton's interpreter runs the largest tiles)."]
    return lines


def _section_sanitizer(f: dict) -> list[str]:
    tools = f.get("tools", {})
    if not tools:
        return []
    lines = [f"`{f['sanitizer']}` over every launch config of every kernel, one small forward and backward each.", "",
             "| tool | exit | errors | warnings | target calls | target failures |", "|---|---|---|---|---|---|"]
    for tool, t in tools.items():
        failed = "-" if t["target_failed"] is None else len(t["target_failed"])  # None: the target never recorded
        calls = "-" if t["target_calls"] is None else t["target_calls"]
        lines.append(f"| {tool} | {t['exit']} | {t['errors']} | {t['warnings']} | {calls} | {failed} |")
    findings = [line for t in tools.values() for line in t["findings"]]
    return lines + (["", "```", *findings, "```"] if findings else [])


SECTIONS = {"env": _section_env, "warmup": _section_warmup, "verify": _section_verify, "tests": _section_tests,
            "determinism": _section_determinism, "ops": _section_ops, "train": _section_train,
            "compiled": _section_train, "sanitizer": _section_sanitizer}


def markdown(report: dict) -> str:
    """``report.md``: the header (GPU, versions, date), the table of stages, then a section per stage."""
    lines = _header(report)
    if report.get("error"):
        lines += ["", f"**{report['error']}**"]
    lines += ["", "| stage | status | seconds | budget s | compiles | summary |", "|---|---|---|---|---|---|"]
    for name, entry in report["stages"].items():
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry['budget_s']:.0f} | "
                     f"{_compiles(entry)} | {summary(name, entry).replace('|', '/')} |")
    for name, entry in report["stages"].items():
        lines += ["", f"## {name}: {STAGES[name].title}", ""]
        if entry["status"] != "ok":
            lines += [f"**{entry['status']}**" + (f": {entry['reason']}" if entry["reason"] else ""), ""]
        lines += SECTIONS[name](entry["figures"])
        if entry["status"] in ("failed", "timeout"):
            lines += ["", "Output (tail):", "", "```", entry["output_tail"].rstrip()[-2000:], "```"]
    lines += ["", f"Figures from `python -m bench.gpu_report` on the machine named above; "
                  f"total {report.get('total_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"
