"""Smoke stage: load each GGUF with llama.cpp in each placement and measure it.

Every figure is measured here and names its method. Speed is measured as llama-bench measures it: the model
is loaded once per placement (load time is its own figure), one warm-up generation runs on that context,
then N timed generations, each from an empty KV cache: the prompt decoded as one batch, then one decode per
greedily sampled token, all through llama.cpp's C API. llama.cpp's own log (captured through llama_log_set)
is the evidence of where each tensor went and what the context ran with.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from moeprep import hardware as gpu
from moeprep import placement as placements_
from moeprep.errors import MoeprepError
from moeprep.files import human_bytes, matches, sha256_file
from moeprep.ggufio.probe import expected_overrides, probe
from moeprep.inputs import check_file
from moeprep.limits import MAX_SIZE
from moeprep.llama.build import backends, devices
from moeprep.llama.context import ContextParams, session
from moeprep.llama.evaluate import chunking
from moeprep.llama.log import LoadLog, parse_log
from moeprep.llama.sizing import read_simulation, simulate_context
from moeprep.placement import CPU_MOE, GPU, Placement
from moeprep.quality import scoring as quality
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import (
    FileResult,
    FlashAttn,
    PlacementResult,
    Runtime,
    SmokeReport,
    SmokeSettings,
    Statistic,
    Tokens,
    Vram,
)
from moeprep.shell import hint
from moeprep.stages.measure import context_params, quality_of, reference_for, resolved
from moeprep.tools import versions


def runtime(log: LoadLog, params: ContextParams) -> Runtime:
    def number(key: str) -> int | None:
        value = log.context.get(key, "")
        return int(value) if value.isdigit() else None

    return Runtime(params.threads, params.threads, number("n_ctx"), number("n_batch"), number("n_ubatch"),
                   FlashAttn.parse(fa) if (fa := log.context.get("flash_attn")) else None, log.flash_attn_used, n_seq_max=number("n_seq_max"),
                   kv_unified={"true": True, "false": False}.get(log.context.get("kv_unified", "")))


def run_placement(path: Path, placement: Placement, expected: list[str], settings: SmokeSettings,
                  nvml: gpu.Nvml | None) -> PlacementResult:
    """One placement measured as llama-bench measures: one load (its own figure), a warm-up generation on that
    context, then `settings.runs` timed generations, each from an empty KV cache."""
    params = context_params(settings)
    lines: list[str] = []
    before = nvml.used_mib() if nvml else None
    start = time.perf_counter()
    with session(path, placement.patterns, params, lines) as s:
        load_s = time.perf_counter() - start
        after = (nvml.used_mib(), nvml.process_mib()) if nvml else (None, None)
        prompt = s.tokenize(settings.prompt.encode())
        for _ in range(settings.warmup_runs):
            s.prompt(prompt)
            s.generate(prompt, settings.new_tokens)
        # As llama-bench runs its pp test and then its tg test: the prompt alone N times, then N generations.
        prompts = [s.prompt(prompt) for _ in range(settings.runs)]
        gens, peaks = [], []
        for _ in range(settings.runs):
            if nvml:
                with gpu.PeakWatch(nvml) as watch:
                    gens.append(s.generate(prompt, settings.new_tokens))
                peaks.append((watch.peak_mib, watch.process_peak_mib))
            else:
                gens.append(s.generate(prompt, settings.new_tokens))
        text = s.detokenize(gens[0].tokens)
    log = parse_log("".join(lines))
    moved = sorted(o.tensor for o in log.overridden)
    failures = []
    if moved != sorted(expected):
        failures.append(f"{placement.name}: llama.cpp overrode {len(moved)} tensors, the probe expects {len(expected)}")
    counts = [len(g.tokens) for g in gens]
    if not all(counts):
        failures.append(f"{placement.name}: empty output (end of generation before the first token)")
    vram = None
    if nvml:
        vram = Vram(METHODS["vram"], Statistic.of([before]), Statistic.of([after[0]]),
                    Statistic.of([p[0] for p in peaks]), Statistic.of([after[1]]), Statistic.of([p[1] for p in peaks]))
    return PlacementResult(
        placement=placement,
        patterns=placement.patterns,
        overridden=log.overridden,
        overrides_match_probe=moved == sorted(expected),
        buffers=log.buffers,
        runs=settings.runs,
        warmup_runs=settings.warmup_runs,
        load_s=Statistic.of([load_s]),
        ttft_s=Statistic.of([g.first_s for g in gens]),
        decode_tps=Statistic.of([g.decodes / g.decode_s if g.decodes and g.decode_s > 0 else None for g in gens]),
        decode_tps_llama=Statistic.of([_rate(*g.llama_decode) for g in gens]),
        prompt_tps=Statistic.of([len(prompt) / seconds if seconds > 0 else None for seconds, _, _ in prompts]),
        prompt_tps_llama=Statistic.of([_rate(n, ms) for _, n, ms in prompts]),
        tokens=Tokens(len(prompt), counts),
        greedy_tokens=gens[0].tokens,
        greedy_text=text,
        vram_mib=vram,
        failures=failures,
        runtime=runtime(log, params),
    )


def _rate(n: int, ms: float) -> float | None:
    return n / (ms / 1000) if n and ms > 0 else None


@dataclass
class Target:
    path: Path
    quant: str | None
    sha256: str | None = None


def smoke_file(target: Target, settings: SmokeSettings, nvml: gpu.Nvml | None,
               reference: quality.Reference | None, status: Status = quiet) -> FileResult:
    """All measurements of one GGUF in every placement of `settings`, and its quality against `reference`."""
    report = probe(target.path, n_values=[])
    chosen = [placements_.parse(name, report.block_count) for name in settings.placements]
    result = FileResult(target.path.name, target.quant or report.file_type, target.sha256)
    for placement in chosen:
        status(f"smoke {target.path.name}: {placement.name}, {settings.runs} runs after a warm-up")
        measured = run_placement(target.path, placement, expected_overrides(report, placement), settings, nvml)
        result.placements[placement.name] = measured
        result.failures += measured.failures

    names = list(result.placements)
    if "gpu" in names and "cpu-moe" in names:
        result.greedy_agreement = quality.greedy_agreement(
            result.placements["gpu"].greedy_tokens, result.placements["cpu-moe"].greedy_tokens, ["gpu", "cpu-moe"])

    if reference is not None:
        same = target.sha256 is not None and target.sha256 == reference.sha256
        status(f"smoke {target.path.name}: perplexity and KL divergence against {reference.path} over "
               f"{reference.chunks} chunks of {reference.chunking.ctx} tokens of {reference.text.name}"
               + (" (scored in the reference's own pass)" if same else ""))
        result.quality = (reference.own if same else None) or quality_of(target.path, reference, settings)
        if not result.quality.finite:
            result.failures.append("NaN or inf in the logits")
        first = result.placements[names[0]].greedy_tokens
        if quality.degenerates_alone(first, reference.greedy_tokens):
            result.failures.append(f"degenerate output: one token repeats through most of the {names[0]} generation, "
                                   "where the F16 reference does not")
    result.ok = not result.failures
    return result


def _targets(target: Path, manifest: mf.Manifest | None) -> list[Target]:
    if target.is_dir():
        if manifest is None or not manifest.artifacts:
            raise MoeprepError(f"the manifest in {target} lists no artifacts", "run `moeprep convert` first")
        return [Target(target / a.path, a.quant, a.sha256) for a in manifest.artifacts]
    if not target.is_file():
        raise MoeprepError(f"{target} does not exist", "give a .gguf file or an output directory")
    known = manifest.artifact_at(target.name) if manifest else None
    return [Target(target, known.quant if known else None, known.sha256 if known else None)]


def run(target: Path, settings: SmokeSettings | None = None, *, reference: Path | None = None,
        only_stale: bool = False, quality: bool = True, quality_text: Path | None = None,
        status: Status = quiet) -> Outcome:
    """Smoke a GGUF file, or every artifact of an output directory (recording the results in its manifest).

    With `only_stale`, files whose recorded smoke measured these bytes with these settings are kept.
    With `quality` off, no reference is loaded (a staged release measures quality in prepare: kld.py).
    Quality is measured on `quality_text` (moeprep's own evaluation text if None); the settings record
    its name and sha256.
    The outcome's `result` is the SmokeReport of what was measured now (None if nothing was).
    """
    target = Path(target)

    settings, text = resolved(settings or SmokeSettings(), quality_text)
    for name in settings.placements:
        placements_.parse(name)
    out = target if target.is_dir() else target.parent
    manifest = mf.load(target) if target.is_dir() else mf.load_or_none(out)
    targets = _targets(target, manifest)
    outcome: Outcome[SmokeReport] = Outcome(Stage.SMOKE)
    if only_stale and manifest and manifest.smoke and manifest.smoke.settings.key() == settings.key():
        current = {t.path.name for t in targets if (a := manifest.artifact_at(t.path.name))
                   and manifest.smoke_result(a) is not None}
        outcome.kept = sorted(current)
        targets = [t for t in targets if t.path.name not in current]
    for t in targets:
        _check_unchanged(t)
    if not targets:
        return outcome
    first = probe(targets[0].path, n_values=[])
    if settings.sweep:  # the offload curve of this model: which placements follows from its blocks
        settings = replace(settings, placements=sweep(first.block_count))
    for name in settings.placements:  # N of n-cpu-moe=N is bounded by the model before any work
        placements_.parse(name, first.block_count)
    given = reference is not None
    if reference is None and quality and manifest is not None and manifest.base is not None:
        reference = out / manifest.base.path
    reference_sha256 = None
    if reference is not None:
        check_file(reference, MAX_SIZE, "the reference", "give the F16 GGUF the quants were made from")
        reference_sha256 = _reference_sha256(reference, manifest, out)
        base = manifest.base if manifest is not None else None
        if given and base is not None and reference_sha256 != base.sha256:
            # the card's quality table is "against the F16": the results in this manifest are against its F16
            raise MoeprepError(f"--reference {reference.name} is not {base.path}, the converted file the manifest in "
                               f"{out} lists (sha256 differs); its results are all measured against that one",
                               "leave --reference out, or smoke a copy of the files in another directory")
    check_bounds(settings, first, targets[0].path, quality=reference is not None)

    nvml, nvml_status = gpu.nvml()
    backend = backends([d for d in devices() if d["type"] != "CPU"]) or ["CPU"]
    report = SmokeReport(
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        backend="+".join(backend),
        nvml=nvml_status,
        hardware=gpu.hardware(nvml),
        tools=versions(),
        settings=settings,
        methods=METHODS,
    )
    _check_others_kept(manifest, report, {t.path.name for t in targets}, out)
    ref = None
    if reference is not None:
        status(f"reference: {reference.name}")
        ref = reference_for(reference, reference_sha256, settings, text)
    for t in targets:
        report.artifacts[t.path.name] = smoke_file(t, settings, nvml, ref, status)
        outcome.made.append(t.path.name)
    if manifest is not None:
        manifest.smoke = report.merged_into(manifest.smoke)
        mf.save(out, manifest)
    outcome.result = report
    return outcome


SWEEP_POINTS = 8  # n-cpu-moe=N values measured for a model with more blocks, both ends included


def sweep(block_count: int) -> list[Placement]:
    """The offload curve's placements: everything on the GPU, the experts of the first N blocks on the CPU for every
    N (a small model) or about eight N from 1 to every block, and --cpu-moe."""
    if block_count <= SWEEP_POINTS:
        ns = list(range(1, block_count + 1))
    else:
        step = (block_count - 1) / (SWEEP_POINTS - 1)
        ns = sorted({round(1 + i * step) for i in range(SWEEP_POINTS)})
    return [GPU, *(Placement(f"n-cpu-moe={n}") for n in ns), CPU_MOE]


def check_bounds(settings: SmokeSettings, report, path: Path, *, quality: bool) -> None:
    """Every setting that becomes an allocation, against the model and this machine, before anything is loaded:
    the contexts against the trained context, threads against the CPUs, and on a build without a GPU (where the
    KV cache and compute buffer are host memory) what llama.cpp would allocate against the memory available."""
    trained = report.context_length
    for what, ctx in (("--ctx", settings.ctx), ("--quality-ctx", settings.quality_ctx if quality else 0)):
        if trained and ctx > trained:
            raise MoeprepError(f"{what} {ctx} is longer than the {trained} tokens {path.name} was trained for",
                               f"give {what} {trained} or less")
    cpus = os.cpu_count() or 1
    if settings.threads and settings.threads > cpus:
        raise MoeprepError(f"--threads {settings.threads} is more than the {cpus} CPUs this machine has",
                           f"give --threads {cpus} or less, or leave it out for one per physical core")

    if any(d["type"] in ("GPU", "IGPU") for d in devices()):
        return  # the caches go to the GPU, and llama.cpp refuses what does not fit there with its own reason
    available = gpu.available_memory()
    contexts = [context_params(settings)]
    if quality:
        chunks = chunking(settings.quality_ctx, settings.n_batch, settings.n_ubatch)
        contexts.append(ContextParams(n_ctx=chunks.n_ctx, n_batch=chunks.n_batch, n_ubatch=chunks.n_ubatch,
                                      n_seq_max=chunks.n_seq, kv_unified=False, threads=1))
    for params in contexts:
        sim = read_simulation(simulate_context(path, patterns=[], params=params), None)
        need = sim.kv + sim.compute
        if available is not None and need > available:
            raise MoeprepError(f"a context of {params.n_ctx} tokens for {path.name} needs {human_bytes(need)} for its "
                               f"KV cache and compute buffer, and this machine has {human_bytes(available)} available",
                               "lower --ctx, --quality-ctx or --batch")


def _reference_sha256(reference: Path, manifest: mf.Manifest | None, out: Path) -> str:
    """The sha256 of the bytes every KL divergence will be measured against: the manifest's, where the reference is
    the file it lists (and still those bytes), else computed now."""
    known = manifest.artifact_at(reference.name) if manifest and reference.resolve().parent == out.resolve() else None
    if known is None:
        return sha256_file(reference)
    if not matches(reference, known.size, known.sha256, known.mtime_ns):
        raise MoeprepError(f"the reference {reference} no longer matches the sha256 in its manifest",
                           "rerun `moeprep convert` to make it again, then smoke again")
    return known.sha256


def _check_others_kept(manifest: mf.Manifest | None, report: SmokeReport, smoking: set[str], out: Path) -> None:
    """A smoke of some files adds to the results of the others, which one table shows: that needs the same
    settings and the same kind of machine. Where either differs, smoking part of the directory would drop the
    others' results, so it is refused."""
    old = manifest.smoke if manifest else None
    others = sorted(name for name in (old.artifacts if old else {}) if name not in smoking)
    if old is None or not others or (old.settings.key() == report.settings.key() and old.machine() == report.machine()):
        return
    why = "other settings" if old.settings.key() != report.settings.key() else "another machine"
    raise MoeprepError(f"{out / mf.FILENAME} holds results for {', '.join(others[:3])}{' …' if len(others) > 3 else ''} "
                       f"measured with {why}; smoking only {', '.join(sorted(smoking))} would drop them",
                       f"smoke the whole directory ({hint('moeprep', 'smoke', out)}), or use the settings "
                       "its manifest records")


def _check_unchanged(target: Target) -> None:
    """Results are recorded against a sha256, so the bytes measured must be the bytes the manifest lists."""
    if not target.path.is_file():
        raise MoeprepError(f"{target.path} is listed in the manifest but missing",
                           "rerun `moeprep convert` to make it again, then smoke again")
    if target.sha256 is None:
        target.sha256 = sha256_file(target.path)
    elif sha256_file(target.path) != target.sha256:
        raise MoeprepError(f"{target.path} no longer matches the sha256 in its manifest",
                           "rerun `moeprep convert` to rebuild it, then smoke again")


METHODS = {
    "load_s": "wall time of one llama_model_load_from_file + llama_init_from_model per placement (the file may be "
              "cold in the page cache for the first placement)",
    "ttft_s": "wall time from the start of the prompt's decode to the first token sampled (prompt decode as one "
              "batch, synchronised, plus one greedy sample), from an empty KV cache",
    "decode_tps": "single-token llama_decode calls after the prompt / wall time from the first token sampled to the "
                  "last (each decode followed by a greedy llama_sampler_sample, as llama-bench's tg decodes and "
                  "synchronises each token)",
    "decode_tps_llama": "llama_perf_context n_eval / t_eval_ms",
    "prompt_tps": "prompt tokens / wall time of their one-batch llama_decode and llama_synchronize from an empty KV "
                  "cache, N times in a row before the generations (llama-bench's pp test)",
    "prompt_tps_llama": "llama_perf_context n_p_eval / t_p_eval_ms",
    "runs": "one load per placement, one warm-up (prompt and generation) on that context, then N timed prompts and N "
            "timed generations, each from a cleared KV cache, as llama-bench runs its pp and tg tests",
    "vram": "NVML, device 0, polled every 10 ms: this process's own memory (nvmlDeviceGetComputeRunningProcesses) "
            "and, as a fallback, the whole device's (nvmlDeviceGetMemoryInfo, every process and CUDA context)",
    "vram_buffers": "llama.cpp's model, KV and compute buffers on GPU devices, from its load log",
    **quality.METHODS,
    "overridden": "llama.cpp log lines 'tensor … buffer type overridden to …' captured with llama_log_set",
    "buffers": "llama.cpp log lines '<device> model|KV|compute|output buffer size = X MiB'",
}
