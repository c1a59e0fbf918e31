"""The one place moeprep writes for humans: status lines to stderr, results to stdout as text or JSON.

Commands hand a typed result and a function that turns it into lines; `--json` prints the same
result as JSON instead, so output can be piped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

import click

from moeprep.files import human_bytes as hb
from moeprep.records.results import text
from moeprep.shell import command

if TYPE_CHECKING:  # the commands import what they run when they run: `moeprep --help` stays fast
    from moeprep.stages.doctor import DoctorReport


def status(line: str) -> None:
    click.echo(f"moeprep: {line}", err=True)

T = TypeVar("T")


def jsonable(value) -> object:
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value, fallback=str)


def emit(result: T, as_json: bool, lines: Callable[[T], Iterable[str]]) -> None:
    if as_json:
        click.echo(json.dumps(jsonable(result), indent=2))
    else:
        for line in lines(result):
            click.echo(line)


def notes(outcome) -> None:
    """What a stage wants the user to know, said whether or not the output is JSON."""
    for note in outcome.notes:
        status(f"note: {note}")


def outcome_lines(outcome, out=None) -> list[str]:
    from moeprep.records.manifest import Manifest

    lines = []
    m = outcome.result
    if isinstance(m, Manifest) and out is not None:
        lines = artifact_lines(m.artifacts, out)
    lines.append(f"made {len(outcome.made)}, kept {len(outcome.kept)}" + (f"; manifest: {out / 'manifest.json'}" if out else ""))
    return lines


def artifact_lines(artifacts, folder) -> list[str]:
    return [f"{a.sha256}  {a.size:>14,}  {folder / a.path}" for a in artifacts]


def probe_lines(r, all_n: bool = False) -> list[str]:
    lines = [f"{r.file}: {r.architecture}, {r.file_type}, {r.n_params / 1e6:,.1f}M parameters, {r.block_count} blocks"]
    if r.is_moe:
        lines.append(f"experts: {r.expert_count}, used per token: {r.expert_used_count}, shared: "
                     f"{r.expert_shared_count}, leading dense blocks: {r.leading_dense_block_count}")
    lines.append(f"layout: {r.layout}" + ("" if r.loadable else " (current llama.cpp cannot load it)"))
    lines += [f"note: {note}" for note in r.notes]
    if r.types:
        lines.append("types: " + "; ".join(f"{cls} " + ", ".join(f"{t} x{n}" for t, n in sorted(by.items()))
                                           for cls, by in r.types.items()))
    b = r.bytes
    lines.append(f"bytes: experts {hb(b['expert'])}, shared experts {hb(b['shared_expert'])}, "
                 f"routers {hb(b['router'])}, other {hb(b['other'])}, total {hb(b['total'])}")
    for layer in r.layers:
        names = ", ".join(t.name.split(".", 2)[2] for t in layer.experts)
        keep = ", ".join(t.name.split(".", 2)[2] for t in layer.shared + layer.router)
        lines.append(f"  blk.{layer.block}: experts {hb(layer.expert_bytes)} [{names}]" + (f"; stays on GPU: {keep}" if keep else ""))
    n_cpu = [p for p in r.placements if p.name.startswith("n-cpu-moe")]
    shown = [p for p in r.placements if not p.name.startswith("n-cpu-moe")] + (n_cpu if all_n else n_cpu[:4])
    lines.append("placement          tensors to CPU   bytes to CPU    weights on GPU   override")
    for p in shown:
        override = " ".join(p.patterns[:1]) + (" …" if len(p.patterns) > 1 else "") if p.patterns else "(none)"
        lines.append(f"  {p.name:<16} {p.tensors_moved:>8}   {hb(p.bytes_moved):>14}   {hb(p.bytes_on_gpu):>14}   {override}")
    return lines


def smoke_lines(report) -> list[str]:
    if report is None:
        return ["every file's recorded smoke is up to date; nothing measured"]
    lines = [f"backend {report.backend}; {report.hardware.cpu}; NVML: {report.nvml}"]
    run = next((p.runtime for r in report.artifacts.values() for p in r.placements.values() if p.runtime), None)
    if run:
        lines.append(f"llama.cpp ran with {run.text()}")
    for name, r in report.artifacts.items():
        lines.append(f"{name}: {'ok' if r.ok else 'FAILED'}; {quality_text(r.quality)}")
        for p in r.placements.values():
            need, own = p.gpu_mib(), p.vram_mib.process_peak if p.vram_mib else None
            vram = (f"GPU buffers {need:.0f} MiB" if need is not None else "VRAM not measured") + (
                f", process peak {own.text(0, True)} MiB" if own is not None and own.measured else "")
            lines.append(f"  {p.placement:<14} decode {text(p.decode_tps, 1, True)} tok/s, TTFT {text(p.ttft_s, 4, True)} s, "
                         f"prompt {text(p.prompt_tps, 1, True)} tok/s, load {text(p.load_s, 3, True)} s; "
                         f"{len(p.overridden)} tensors overridden ({'= probe' if p.overrides_match_probe else 'MISMATCH'}); {vram}")
        lines += [f"  failure: {failure}" for failure in r.failures]
    return lines


def quality_text(q) -> str:
    """A file's quality in one line, as llama-perplexity --kl-divergence states it."""
    if q is None:
        return "quality not measured"
    if not q.finite:
        return "non-finite logits"
    if not q.chunked:  # recorded before chunked evaluation
        return f"KLD vs {q.reference} {q.kld_mean:.6f}, top-1 {q.top1_agreement:.3f} ({q.positions} positions)"
    return (f"PPL {q.ppl:.4f} ± {q.ppl_se:.4f} (F16 {q.ppl_reference:.4f}); KLD vs {q.reference} {q.kld_mean:.6f} ± "
            f"{q.kld_se:.6f}, median {q.kld_median:.6f}, 99% {q.kld_p99:.6f}, 99.9% {q.kld_p999:.6f}, max "
            f"{q.kld_max:.6f}; same top {100 * q.top1_agreement:.2f} %; RMS Δp {100 * q.rms_dp:.3f} %; "
            f"{q.chunks} chunks of {q.ctx} of {q.text}")


def plan_lines(r) -> list[str]:
    kv = r.rows[0].kv_cache if r.rows else 0
    included = any(p.compute is not None for p in r.rows)
    fa = f"{r.flash_attn}" + (f" (runs as {r.flash_attn_used})" if r.flash_attn_used and r.flash_attn != r.flash_attn_used else "")
    settings = f"ctx {r.ctx}" + (f", n_batch {r.n_batch}, n_ubatch {r.n_ubatch}, flash attention {fa}"
                                 if included else "")
    lines = [f"{r.file}: PREDICTED from the GGUF (nothing loaded onto a GPU), {settings}"
             + ("" if included else "; compute buffer not included"),
             f"KV cache {hb(kv)}: {r.kv_cache_method}",
             f"compute buffer: {r.compute_buffer}"]
    if r.flash_attn_note:
        lines.append(r.flash_attn_note)
    lines.append(f"token_embd ({hb(r.token_embd_on_cpu)}) stays in host memory in every placement")
    other = {"on": "off", "off": "on"}.get(str(r.flash_attn_used))
    lines.append("placement        weights on GPU   + KV cache    + compute   = predicted   measured (GPU smoke, error)"
                 + (f"   [compute with flash attention {other}]" if other and included else ""))
    for p in r.rows:
        compute = hb(p.compute) if p.compute is not None else "-"
        fits = "" if p.fits is None else ("  fits" if p.fits else "  too big")
        alt = p.compute_by_flash_attn.get(other or "")
        lines.append(f"  {p.placement:<14} {hb(p.weights_on_gpu):>14} {hb(p.kv_cache):>12} {compute:>12} "
                     f"{hb(p.predicted_total):>11}   {_measured(p)}{fits}" + (f"   [{hb(alt)}]" if alt is not None else ""))
    if r.measured_note:
        lines.append(f"measured: {r.measured_note}")
    if r.vram:
        lines.append(f"smallest placement predicted to fit {hb(r.vram)}: {r.recommended or 'none'}")
    return lines


def _measured(p) -> str:
    if not p.measured:
        return "no GPU smoke recorded"
    text = f"model {hb(p.measured.model)}" + (f" ({p.weights_error_pct:+.1f} %)" if p.weights_error_pct is not None else "")
    if p.compute_error_pct is not None:
        text += (f", compute {hb(p.measured.compute)} ({p.compute_error_pct:+.1f} %), total "
                 f"{hb(p.measured.model + p.measured.kv + p.measured.compute)} ({p.total_error_pct:+.1f} %)")
    return text


def tier_lines(t) -> list[str]:
    lines = [f"PREDICTED, not measured: {t.method}",
             f"headroom kept below each size: {t.headroom_mib:.0f} MiB ({t.headroom_method})"]
    for ctx in t.contexts:
        lines.append(f"context {ctx}:")
        for tier in (x for x in t.tiers if x.ctx == ctx):
            lines.append(f"  {tier.gib:g} GiB:")
            for c in tier.cells:
                if c.placement is None:
                    lines.append(f"    {c.quant:<10} does not fit")
                    continue
                lines.append(f"    {c.quant:<10} {c.placement:<13} GPU {hb(c.gpu_bytes):>11}  RAM {hb(c.ram_bytes):>11}  "
                             f"{c.command}" + ("  (a GPU smoke measured this placement)" if c.measured else ""))
    if t.longest:
        lines.append(f"longest context that fits, {t.cache_type} K and V caches (linear between llama.cpp's sizings):")
        for x in t.longest:
            reach = ("does not fit" if x.ctx is None else
                     f"{x.ctx} tokens{' (the longest sized: the model limit)' if x.limit else ''} as {x.placement}")
            lines.append(f"  {x.gib:g} GiB  {x.quant:<10} {reach}")
    return lines


def push_lines(result) -> list[str]:
    lines = []
    for r in result.repos:
        lines.append(f"{r.url}" + (f" (commit {r.commit})" if r.commit else ""))
        lines += [f"  {i.action:<30} {i.size:>14,}  {i.local} -> {r.repo_id}/{i.path_in_repo}" for i in r.items]
    lines.append(("dry run: nothing uploaded; " if result.dry_run else "") + f"{result.uploaded} files to upload")
    return lines


def release_lines(report) -> list[str]:
    lines = [f"{name}: {o.summary()}" for name, o in report.stages.items()]
    lines.append("done" if report.did_work else "nothing to do: every stage was up to date")
    return lines


def demo_lines(done) -> list[str]:
    lines = outcome_lines(done.convert, done.out)
    lines += smoke_lines(done.smoke.result) if done.smoke.result else ["smoke: every file's recorded smoke is up to date"]
    lines += plan_lines(done.plan)
    lines += [f"card: {p}" for p in done.card.result]
    lines.append(f"next: {command('moeprep', 'probe', done.out / done.plan.file)}")
    return lines


def _build_lines(commit: str | None, build: dict, programs: dict) -> list[str]:
    if not build:
        return ["llama.cpp build: not made by scripts/setup (no moeprep-build.json beside libllama)"]
    lines = [f"llama.cpp build: commit {build['llama_cpp_commit']}, backends {', '.join(build['backends']) or 'cpu'}"
             + (f", CUDA architectures {build['cuda_architectures']}" if build.get("cuda_architectures") else "")
             + f"; CMAKE_ARGS {' '.join(build['cmake_args']) or '(none)'}"]
    base = (commit or "").removesuffix("-dirty")
    for name, c in programs.items():
        verdict = "missing or silent" if c is None else ("same build" if c == base else f"ANOTHER commit than libllama's {base}")
        lines.append(f"  {name}: {c or '-'} ({verdict})")
    return lines


def doctor_lines(d: DoctorReport) -> list[str]:
    t = d.tools
    lines = [f"llama.cpp {t['llama_cpp_commit']} via llama-cpp-python {t['llama_cpp_python']}; "
             f"backends: {', '.join(d.backends)}; GPU offload {'yes' if t['gpu_offload'] else 'no'}"]
    lines += [f"  {x['name']}: {x['description']} ({x['type']}), {hb(x['memory_total'])} total, {hb(x['memory_free'])} free"
              for x in d.devices]
    lines += _build_lines(t["llama_cpp_commit"], d.build, d.programs)
    lines.append(f"NVML: {d.nvml}")
    hw = d.hardware
    lines += [f"  GPU {g.index}: {g.name}, {g.memory_total_mib:.0f} MiB, driver {g.driver}, CUDA {g.cuda}" for g in hw.gpus]
    lines.append(f"CPU: {hw.cpu} ({hw.cpu_cores} cores), RAM {hw.ram_gib} GiB")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    g = d.gguf
    lines.append(f"gguf module: {g['distribution']} {g['version']}, {g['files_checked']} files checked, "
                 f"{len(g['files_changed'])} changed")
    return lines
