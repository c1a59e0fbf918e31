"""Smoke stage: load each GGUF with llama-cpp-python in each placement and measure it.

Every figure is measured here and names its method: N timed runs after one warm-up, mean and
standard deviation, token counts from token ids. llama.cpp's own log (captured through
llama_log_set) is the evidence of where each tensor went.
"""

from __future__ import annotations

import re
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import gpu, quality
from . import quality as _quality  # run() has a parameter named quality
from . import manifest as mf
from . import placement as placements_
from .errors import MoeprepError
from .files import sha256_file
from .outcome import Outcome, Status, quiet
from .placement import Placement
from .probe import expected_overrides, probe
from .results import (Buffer, FileResult, Override, PlacementResult, Quality, Runtime, SmokeReport, SmokeSettings,
                      Statistic, Tokens, Vram)

_OVERRIDE = re.compile(r"^tensor (\S+) \((\d+) MiB (\S+)\) buffer type overridden to (\S+)")
_BUFFER = re.compile(r"^(\w+):\s+(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")
_CONTEXT = re.compile(r"^llama_context: (n_ctx|n_batch|n_ubatch|flash_attn)\s+= (\S+)")
_FLASH_USED = re.compile(r"Flash Attention (enabled|disabled)")


@dataclass
class LoadLog:
    overridden: list[Override]
    buffers: list[Buffer]
    context: dict[str, str]  # llama_context's own n_ctx, n_batch, n_ubatch, flash_attn
    flash_attn_used: bool | None = None


def parse_log(text: str) -> LoadLog:
    """The overridden tensors, per-device buffer sizes and context settings in a llama.cpp load log."""
    log = LoadLog([], [], {})
    for line in text.splitlines():
        if m := _OVERRIDE.match(line.strip()):
            log.overridden.append(Override(m.group(1), m.group(3), m.group(4)))
        elif m := _BUFFER.match(line.strip()):
            log.buffers.append(Buffer(m.group(2), m.group(3), float(m.group(4)), m.group(1)))
        elif m := _CONTEXT.match(line.strip()):
            log.context[m.group(1)] = m.group(2)
        elif log.flash_attn_used is None and (m := _FLASH_USED.search(line)):
            log.flash_attn_used = m.group(1) == "enabled"
    return log


def runtime(log: LoadLog, settings: SmokeSettings) -> Runtime:
    def number(key: str) -> int | None:
        value = log.context.get(key, "")
        return int(value) if value.isdigit() else None

    return Runtime(settings.threads, settings.threads, number("n_ctx"), number("n_batch"), number("n_ubatch"),
                   log.context.get("flash_attn"), log.flash_attn_used)


def _open(path: Path, patterns: list[str], settings: SmokeSettings, *, n_ctx: int | None = None,
          logits_all: bool = False):
    """Load `path` with the given overrides, every layer offloaded, as llama-server would with `settings`.

    Returns (llm, load log, seconds).
    """
    from llama_cpp import Llama

    from .libllama import capture_log, flash_attn, model_params_with_overrides

    lines: list[str] = []
    with capture_log(lambda level, text: lines.append(text)), model_params_with_overrides(patterns), \
            flash_attn(settings.flash_attn):
        start = time.perf_counter()
        try:
            llm = Llama(str(path), n_ctx=n_ctx or settings.ctx, n_gpu_layers=-1, n_threads=settings.threads,
                        n_threads_batch=settings.threads, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                        logits_all=logits_all, verbose=False, seed=0)
        except Exception as e:  # llama-cpp-python raises ValueError("Failed to load model from file")
            tail = [line.strip() for line in lines if "error" in line.lower()][-1:] or [str(e)]
            raise MoeprepError(f"llama.cpp could not load {path.name}: {tail[0]}", "see `moeprep probe` for its layout") from e
        seconds = time.perf_counter() - start
    return llm, "".join(lines), seconds


@dataclass
class Generation:
    tokens: list[int]
    text: str
    ttft_s: float | None
    decode_tps: float | None
    prompt_tps: float | None
    decode_tps_llama: float | None


def _generate(llm, prompt: list[int], n_new: int) -> Generation:
    """One greedy generation from a clean KV cache, timed from the token stream and by llama.cpp."""
    import llama_cpp

    llm.reset()  # n_tokens = 0: generate() re-evaluates the whole prompt instead of reusing the cache
    ctx = llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    vocab = llm._model.vocab
    tokens: list[int] = []
    start = time.perf_counter()
    first = last = None
    for token in llm.generate(prompt, temp=0.0, reset=True):
        now = time.perf_counter()
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        first = first or now
        last = now
        tokens.append(token)
        if len(tokens) == n_new:
            break
    perf = llama_cpp.llama_perf_context(ctx)
    return Generation(
        tokens=tokens,
        text=llm.detokenize(tokens).decode("utf-8", errors="replace"),
        ttft_s=(first - start) if first else None,
        decode_tps=(len(tokens) - 1) / (last - first) if first and last and last > first else None,
        prompt_tps=perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms > 0 else None,
        decode_tps_llama=perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else None,
    )


def run_placement(path: Path, placement: Placement, expected: list[str], settings: SmokeSettings,
                  nvml: gpu.Nvml | None) -> PlacementResult:
    """Warm-up plus `settings.runs` timed runs of load → generate → close in one placement."""
    loads, gens = [], []
    readings: dict[str, list[float | None]] = {k: [] for k in ("before", "after", "peak", "own_after", "own_peak")}
    log = None
    n_prompt = 0
    for i in range(settings.runs + settings.warmup_runs):
        now = {"before": nvml.used_mib() if nvml else None}
        llm, text, seconds = _open(path, placement.patterns, settings)
        try:
            now |= {"after": nvml.used_mib(), "own_after": nvml.process_mib()} if nvml else {}
            prompt = llm.tokenize(settings.prompt.encode())
            n_prompt = len(prompt)
            if nvml:
                with gpu.PeakWatch(nvml) as watch:
                    result = _generate(llm, prompt, settings.new_tokens)
                now |= {"peak": watch.peak_mib, "own_peak": watch.process_peak_mib}
            else:
                result = _generate(llm, prompt, settings.new_tokens)
        finally:
            llm.close()
        if i < settings.warmup_runs:
            log = log or parse_log(text)
            continue  # warm-up runs fill caches and are not counted
        loads.append(seconds)
        gens.append(result)
        for key, values in readings.items():
            values.append(now.get(key))

    moved = sorted(o.tensor for o in log.overridden)
    failures = []
    if moved != sorted(expected):
        failures.append(f"{placement.name}: llama.cpp overrode {len(moved)} tensors, the probe expects {len(expected)}")
    counts = [len(g.tokens) for g in gens]
    if not all(counts):
        failures.append(f"{placement.name}: empty output (end of generation before the first token)")
    return PlacementResult(
        placement=placement.name,
        patterns=placement.patterns,
        overridden=log.overridden,
        overrides_match_probe=moved == sorted(expected),
        buffers=log.buffers,
        runs=settings.runs,
        warmup_runs=settings.warmup_runs,
        load_s=Statistic.of(loads),
        ttft_s=Statistic.of([g.ttft_s for g in gens]),
        decode_tps=Statistic.of([g.decode_tps for g in gens]),
        decode_tps_llama=Statistic.of([g.decode_tps_llama for g in gens]),
        prompt_tps=Statistic.of([g.prompt_tps for g in gens]),
        tokens=Tokens(n_prompt, counts),
        greedy_tokens=gens[0].tokens,
        greedy_text=gens[0].text,
        vram_mib=Vram(METHODS["vram"], *(Statistic.of(readings[k]) for k in ("before", "after", "peak", "own_after",
                                                                            "own_peak"))) if nvml else None,
        failures=failures,
        runtime=runtime(log, settings),
    )


@contextmanager
def _eval_context(path: Path, settings: SmokeSettings, chunks: quality.Chunking) -> Iterator[tuple[object, object]]:
    """(context, vocab) for `path` as llama-perplexity creates them for `chunks`: every layer offloaded, one
    sequence per chunk decoded together, n_ctx = n_seq * ctx, its n_batch and n_ubatch, the smoke's threads and
    flash attention, a sliding-window cache no larger than the window (common's default)."""
    import llama_cpp as ll

    from .libllama import FLASH_ATTN, capture_log

    lines: list[str] = []
    with capture_log(lambda level, text: lines.append(text)):
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = -1
        model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise MoeprepError(f"llama.cpp could not load {path.name} to measure its quality: {_last_error(lines)}",
                               "see `moeprep probe` for its layout")
        try:
            cp = ll.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = chunks.n_ctx, chunks.n_batch, chunks.n_ubatch, chunks.n_seq
            cp.n_threads = cp.n_threads_batch = settings.threads or gpu.physical_cores()
            cp.flash_attn_type = FLASH_ATTN[settings.flash_attn]
            cp.swa_full = False
            ctx = ll.llama_init_from_model(model, cp)
            if not ctx:
                raise MoeprepError(f"llama.cpp could not make a context of {chunks.n_ctx} tokens for {path.name}: "
                                   f"{_last_error(lines)}", "lower --quality-ctx or --batch")
            try:
                yield ctx, ll.llama_model_get_vocab(model)
            finally:
                ll.llama_free(ctx)
        finally:
            ll.llama_model_free(model)


def _last_error(lines: list[str]) -> str:
    found = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return found[-1] if found else "no reason logged"


def tokenize(vocab, data: bytes) -> list[int]:
    """The text as llama-perplexity tokenizes it: common_tokenize(..., add_special=true, parse_special=false)."""
    import llama_cpp as ll

    n_max = len(data) + 16
    buf = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    if n < 0:  # more tokens than room: -n is how many
        n_max = -n
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    return list(buf[:n])


def chunk_logits(ctx, vocab, tokens: list[int], chunks: quality.Chunking, n_chunk: int) -> Iterator[object]:
    """The logits llama-perplexity scores, one [scored, vocab] float32 array per chunk, in order. An array
    may be a view of llama.cpp's own buffer: it is valid until the next one is asked for.

    As perplexity() and kl_divergence() do: n_seq chunks per step from a cleared KV cache, each its own
    sequence; the first token of each chunk replaced by BOS where the vocabulary adds one; outputs asked for
    at positions from ctx/2 on; a chunk longer than n_batch takes several decodes.
    """
    import llama_cpp as ll
    import numpy as np

    c = chunks
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    bos = ll.llama_vocab_bos(vocab) if ll.llama_vocab_get_add_bos(vocab) else None
    steps = -(-c.ctx // c.n_batch)
    memory = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(c.n_batch, 0, c.n_seq)
    try:
        for i in range(0, n_chunk, c.n_seq):
            group = min(c.n_seq, n_chunk - i)
            ll.llama_memory_clear(memory, True)
            outputs: list[list] = [[] for _ in range(group)]
            for j in range(steps):
                begin = j * c.n_batch
                size = min(c.ctx - begin, c.n_batch)
                n = 0
                for seq in range(group):
                    start = (i + seq) * c.ctx + begin
                    for k in range(size):
                        batch.token[n] = bos if bos is not None and j == 0 and k == 0 else tokens[start + k]
                        batch.pos[n] = begin + k
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = seq
                        batch.logits[n] = begin + k >= c.first
                        n += 1
                batch.n_tokens = n
                if (rc := ll.llama_decode(ctx, batch)) != 0:
                    raise MoeprepError(f"llama.cpp failed to decode chunk {i + 1} of the evaluation text (code {rc})",
                                       "lower --quality-ctx or --batch")
                wanted = max(0, begin + size - max(begin, c.first))  # outputs per sequence in this decode
                if wanted:
                    rows = np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(group * wanted, n_vocab))
                    for seq in range(group):  # one decode per chunk: no copy, the next decode comes later
                        part = rows[seq * wanted:(seq + 1) * wanted]
                        outputs[seq].append(part if steps == 1 else part.copy())
            for seq in range(group):
                yield (outputs[seq][0] if steps == 1 else np.concatenate(outputs[seq]))[: c.scored]
    finally:
        ll.llama_batch_free(batch)


def reference_for(path: Path, sha256: str | None, settings: SmokeSettings,
                  text: quality.EvalText | None = None) -> quality.Reference:
    """The F16 over the evaluation text (kept as llama-perplexity --kl-divergence-base keeps it) and its greedy
    output on the prompt."""
    import llama_cpp as ll

    text = text or quality.eval_text()
    chunks = quality.chunking(settings.quality_ctx, settings.n_batch, settings.n_ubatch)
    with _eval_context(path, settings, chunks) as (ctx, vocab):
        tokens = tokenize(vocab, text.data)
        n_chunk = quality.n_chunks(len(tokens), chunks.ctx, settings.quality_chunks, text.name)
        with closing(chunk_logits(ctx, vocab, tokens, chunks, n_chunk)) as logits:
            ref = quality.build_reference(path.name, sha256, text, tokens, chunks, n_chunk,
                                          ll.llama_vocab_n_tokens(vocab), logits)
    ref.greedy_tokens = greedy(path, settings)
    return ref


def greedy(path: Path, settings: SmokeSettings) -> list[int]:
    """Greedy output on the smoke prompt, every layer offloaded: what the collapse check compares."""
    llm, _, _ = _open(path, [], settings)
    try:
        return _generate(llm, llm.tokenize(settings.prompt.encode()), settings.new_tokens).tokens
    finally:
        llm.close()


def quality_of(path: Path, reference: quality.Reference, settings: SmokeSettings) -> Quality:
    """`path` scored against the F16 over the reference's chunks, as llama-perplexity --kl-divergence does."""
    import llama_cpp as ll

    with _eval_context(path, settings, reference.chunking) as (ctx, vocab):
        if (n_vocab := ll.llama_vocab_n_tokens(vocab)) != reference.n_vocab:
            raise MoeprepError(f"{path.name} has a vocabulary of {n_vocab} tokens, the reference {reference.path} "
                               f"{reference.n_vocab}", "compare files made from the same model")
        with closing(chunk_logits(ctx, vocab, reference.tokens, reference.chunking, reference.chunks)) as logits:
            return quality.compare(reference, logits)


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
        result.quality = reference.own if same else quality_of(target.path, reference, settings)
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
    from .libllama import backends, devices
    from .tools import versions

    settings, text = resolved(settings or SmokeSettings(), quality_text)
    for name in settings.placements:
        placements_.parse(name)
    out = target if target.is_dir() else target.parent
    manifest = mf.load(target) if target.is_dir() else mf.load_or_none(out)
    targets = _targets(target, manifest)
    outcome = Outcome("smoke")
    if only_stale and manifest and manifest.smoke and manifest.smoke.settings == settings:
        current = {t.path.name for t in targets if (a := manifest.artifact_at(t.path.name))
                   and manifest.smoke_result(a) is not None}
        outcome.kept = sorted(current)
        targets = [t for t in targets if t.path.name not in current]
    for t in targets:
        _check_unchanged(t)
    if not targets:
        return outcome
    blocks = probe(targets[0].path, n_values=[]).block_count  # N of n-cpu-moe=N is bounded before any work
    for name in settings.placements:
        placements_.parse(name, blocks)
    if reference is None and quality and manifest is not None and manifest.base is not None:
        reference = out / manifest.base.path

    nvml, nvml_status = gpu.nvml()
    backend = backends([d for d in devices() if d["type"] != "CPU"]) or ["CPU"]
    ref = None
    if reference is not None:
        status(f"reference: {reference.name}")
        known = manifest.artifact_at(reference.name) if manifest else None
        ref = reference_for(reference, known.sha256 if known else None, settings, text)
    report = SmokeReport(
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        backend="+".join(backend),
        nvml=nvml_status,
        hardware=gpu.hardware(nvml),
        tools=versions(),
        settings=settings,
        methods=METHODS,
    )
    for t in targets:
        report.artifacts[t.path.name] = smoke_file(t, settings, nvml, ref, status)
        outcome.made.append(t.path.name)
    if manifest is not None:
        manifest.smoke = report.merged_into(manifest.smoke)
        mf.save(out, manifest)
    outcome.result = report
    return outcome


def resolved(settings: SmokeSettings, quality_text: Path | None = None) -> tuple[SmokeSettings, _quality.EvalText]:
    """The settings as recorded (threads resolved; the evaluation text's name and sha256) and the text itself."""
    text = _quality.eval_text(quality_text)
    return replace(settings, threads=settings.threads or gpu.physical_cores(), quality_text=text.name,
                   quality_text_sha256=text.sha256), text


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
    "load_s": "wall time of llama_cpp.Llama(...) construction (model load + context creation)",
    "ttft_s": "wall time from the start of generation to the first streamed token id (prompt eval + first sample)",
    "decode_tps": "(generated token ids - 1) / wall time between the first and last streamed token",
    "decode_tps_llama": "llama_perf_context n_eval / t_eval_ms",
    "prompt_tps": "llama_perf_context n_p_eval / t_p_eval_ms",
    "vram": "NVML, device 0, polled every 10 ms: this process's own memory (nvmlDeviceGetComputeRunningProcesses) "
            "and, as a fallback, the whole device's (nvmlDeviceGetMemoryInfo, every process and CUDA context)",
    "vram_buffers": "llama.cpp's model, KV and compute buffers on GPU devices, from its load log",
    **quality.METHODS,
    "overridden": "llama.cpp log lines 'tensor … buffer type overridden to …' captured with llama_log_set",
    "buffers": "llama.cpp log lines '<device> model|KV|compute|output buffer size = X MiB'",
}
