"""Smoke stage: load each GGUF with llama-cpp-python in each placement and measure it.

Every figure is measured here and names its method: N timed runs after one warm-up, mean and
standard deviation, token counts from token ids. llama.cpp's own log (captured through
llama_log_set) is the evidence of where each tensor went.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu
from .demo import TEXT
from .errors import MoeprepError
from .probe import CPU_MOE_PATTERN, n_cpu_moe_patterns, probe

PROMPT = "A mixture of experts routes every token to a few of many feed-forward networks, so"
QUALITY_TOKENS = 384  # positions compared against the F16 reference: a few hundred, as llama-perplexity --kl-divergence does per chunk

_OVERRIDE = re.compile(r"^tensor (\S+) \((\d+) MiB (\S+)\) buffer type overridden to (\S+)")
_BUFFER = re.compile(r"^(\w+):\s+(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")


@dataclass
class Placement:
    name: str  # "gpu", "cpu-moe", "n-cpu-moe=N"
    patterns: list[str]


def parse_placement(text: str) -> Placement:
    if text == "gpu":
        return Placement("gpu", [])
    if text == "cpu-moe":
        return Placement("cpu-moe", [CPU_MOE_PATTERN])
    if m := re.fullmatch(r"n-cpu-moe=(\d+)", text):
        return Placement(text, n_cpu_moe_patterns(int(m.group(1))))
    raise MoeprepError(f"unknown placement {text!r}", "use gpu, cpu-moe or n-cpu-moe=N")


def parse_log(text: str) -> dict:
    """The overridden tensors and per-device buffer sizes in a llama.cpp load log."""
    overridden, buffers = [], []
    for line in text.splitlines():
        if m := _OVERRIDE.match(line.strip()):
            overridden.append({"tensor": m.group(1), "type": m.group(3), "buffer_type": m.group(4)})
        elif m := _BUFFER.match(line.strip()):
            buffers.append({"device": m.group(2), "kind": m.group(3), "mib": float(m.group(4)), "from": m.group(1)})
    return {"overridden": overridden, "buffers": buffers}


def stat(values: list[float]) -> dict:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return {"mean": None, "sd": None, "n": 0, "values": values}
    return {
        "mean": statistics.fmean(clean),
        "sd": statistics.stdev(clean) if len(clean) > 1 else 0.0,
        "n": len(clean),
        "values": clean,
    }


def degenerate(tokens: list[int]) -> bool:
    """One token repeating through at least half of a generation of 8 or more tokens."""
    if len(tokens) < 8:
        return False
    longest = run = 1
    for a, b in zip(tokens, tokens[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return longest * 2 >= len(tokens)


def loops(tokens: list[int], tail: int = 4) -> bool:
    """Degenerate, or already ending in one repeated token: the reference is heading the same way."""
    return degenerate(tokens) or (len(tokens) >= tail and len(set(tokens[-tail:])) == 1)


def degenerates_alone(candidate: list[int], reference: list[int]) -> bool:
    """The quant collapses into one repeated token where the F16, given the same prompt, does not.
    Tiny random-weight models loop by themselves, so the reference decides what is normal."""
    return degenerate(candidate) and not loops(reference)


def _open(path: Path, patterns: list[str], *, n_ctx: int, threads: int | None, logits_all: bool = False):
    """Load `path` with the given overrides, every layer offloaded; returns (llm, load log, seconds)."""
    from llama_cpp import Llama

    from .libllama import capture_log, model_params_with_overrides

    lines: list[str] = []
    with capture_log(lambda level, text: lines.append(text)), model_params_with_overrides(patterns):
        start = time.perf_counter()
        try:
            llm = Llama(str(path), n_ctx=n_ctx, n_gpu_layers=-1, n_threads=threads, n_batch=min(512, n_ctx),
                        logits_all=logits_all, verbose=False, seed=0)
        except Exception as e:  # llama-cpp-python raises ValueError("Failed to load model from file")
            tail = [line.strip() for line in lines if "error" in line.lower()][-1:] or [str(e)]
            raise MoeprepError(f"llama.cpp could not load {path.name}: {tail[0]}", "see `moeprep probe` for its layout") from e
        seconds = time.perf_counter() - start
    return llm, "".join(lines), seconds


def _generate(llm, prompt: list[int], n_new: int) -> dict:
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
    return {
        "tokens": tokens,
        "ttft_s": (first - start) if first else None,
        "decode_tps": (len(tokens) - 1) / (last - first) if first and last and last > first else None,
        "prompt_tps": perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms > 0 else None,
        "decode_tps_llama": perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else None,
        "n_prompt_eval": perf.n_p_eval,
    }


@dataclass
class Settings:
    runs: int = 3
    ctx: int = 512
    new_tokens: int = 32
    threads: int | None = None
    prompt: str = PROMPT


def run_placement(path: Path, placement: Placement, expected: list[str], settings: Settings,
                  nvml: gpu.Nvml | None) -> dict:
    """Warm-up plus `settings.runs` timed runs of load → generate → close in one placement."""
    loads, gens, vram_before, vram_after, vram_peak = [], [], [], [], []
    log = None
    for i in range(settings.runs + 1):
        before = nvml.used_mib() if nvml else None
        llm, text, seconds = _open(path, placement.patterns, n_ctx=settings.ctx, threads=settings.threads)
        try:
            after = nvml.used_mib() if nvml else None
            prompt = llm.tokenize(settings.prompt.encode())
            if nvml:
                with gpu.PeakWatch(nvml) as watch:
                    result = _generate(llm, prompt, settings.new_tokens)
                peak = watch.peak_mib
            else:
                result, peak = _generate(llm, prompt, settings.new_tokens), None
        finally:
            llm.close()
        if i == 0:
            log = parse_log(text)
            continue  # the warm-up run fills caches and is not counted
        loads.append(seconds)
        gens.append(result | {"n_prompt": len(prompt)})
        vram_before.append(before)
        vram_after.append(after)
        vram_peak.append(peak)

    moved = sorted(o["tensor"] for o in log["overridden"])
    failures = []
    if moved != sorted(expected):
        failures.append(f"{placement.name}: llama.cpp overrode {len(moved)} tensors, the probe expects {len(expected)}")
    counts = [len(g["tokens"]) for g in gens]
    if not all(counts):
        failures.append(f"{placement.name}: empty output (end of generation before the first token)")
    return {
        "placement": placement.name,
        "patterns": placement.patterns,
        "overridden": log["overridden"],
        "overrides_match_probe": moved == sorted(expected),
        "buffers": log["buffers"],
        "runs": settings.runs,
        "warmup_runs": 1,
        "load_s": stat(loads),
        "ttft_s": stat([g["ttft_s"] for g in gens]),
        "decode_tps": stat([g["decode_tps"] for g in gens]),
        "decode_tps_llama": stat([g["decode_tps_llama"] for g in gens]),
        "prompt_tps": stat([g["prompt_tps"] for g in gens]),
        "tokens": {"prompt": gens[0]["n_prompt"], "generated": counts},
        "greedy_tokens": gens[0]["tokens"],
        "vram_mib": {
            "method": "NVML device memory used (nvmlDeviceGetMemoryInfo), device 0, polled every 10 ms",
            "before_load": stat(vram_before), "after_load": stat(vram_after), "peak_generation": stat(vram_peak),
        } if nvml else None,
        "failures": failures,
    }


def logits(path: Path, tokens: list[int], threads: int | None):
    """Next-token logits at every position of `tokens` (one llama.cpp eval with logits_all)."""
    import numpy as np

    llm, _, _ = _open(path, [], n_ctx=len(tokens) + 16, threads=threads, logits_all=True)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def kl_divergence(reference, candidate) -> dict:
    """Per-position KL(P_ref || P_q) and top-1 agreement, as llama-perplexity --kl-divergence reports them."""
    import numpy as np

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    finite = bool(np.isfinite(candidate).all())
    if not finite:
        return {"finite": False}
    lp, lq = log_softmax(reference), log_softmax(candidate)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return {
        "finite": True,
        "kld_mean": float(kld.mean()),
        "kld_sd": float(kld.std(ddof=1)) if len(kld) > 1 else 0.0,
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()),
        "positions": int(len(kld)),
    }


def quality_tokens(path: Path, threads: int | None) -> list[int]:
    llm, _, _ = _open(path, [], n_ctx=64, threads=threads)
    try:
        return llm.tokenize(TEXT.encode())[:QUALITY_TOKENS]
    finally:
        llm.close()


@dataclass
class Target:
    path: Path
    quant: str | None
    sha256: str | None = None
    expected: dict[str, list[str]] = field(default_factory=dict)  # placement -> expert tensor names


def greedy_agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"positions": n, "agreement": same / n if n else None, "identical": a == b, "first_difference": first}


def smoke_file(target: Target, placements: list[Placement], settings: Settings, nvml: gpu.Nvml | None,
               reference: dict | None, status=lambda line: None) -> dict:
    """All measurements of one GGUF. `reference` holds the F16's logits and greedy tokens, if any."""
    report = probe(target.path, n_values=[int(p.name.split("=")[1]) for p in placements if p.name.startswith("n-cpu-moe=")])
    result = {"path": target.path.name, "quant": target.quant or report.file_type, "sha256": target.sha256,
              "placements": {}, "quality": None, "greedy_agreement": None, "failures": []}
    for placement in placements:
        status(f"smoke {target.path.name}: {placement.name}, {settings.runs} runs after a warm-up")
        compiled = [re.compile(p) for p in placement.patterns]
        expected = [t.name for layer in report.layers for t in layer.experts if any(c.search(t.name) for c in compiled)]
        measured = run_placement(target.path, placement, expected, settings, nvml)
        result["placements"][placement.name] = measured
        result["failures"] += measured["failures"]

    names = list(result["placements"])
    if "gpu" in names and "cpu-moe" in names:
        result["greedy_agreement"] = {"between": ["gpu", "cpu-moe"], **greedy_agreement(
            result["placements"]["gpu"]["greedy_tokens"], result["placements"]["cpu-moe"]["greedy_tokens"])}

    if reference is not None:
        status(f"smoke {target.path.name}: KL divergence against {reference['path']}")
        q = kl_divergence(reference["logits"], logits(target.path, reference["tokens"], settings.threads))
        result["quality"] = {"reference": reference["path"], "reference_sha256": reference["sha256"],
                             "text_sha256": reference["text_sha256"], **q}
        if not q["finite"]:
            result["failures"].append("NaN or inf in the logits")
        first = result["placements"][names[0]]["greedy_tokens"]
        if degenerates_alone(first, reference["greedy_tokens"]):
            result["failures"].append(f"degenerate output: one token repeats through most of the {names[0]} generation, "
                                      "where the F16 reference does not")
    result["ok"] = not result["failures"]
    return result


def reference_for(path: Path, sha256: str | None, settings: Settings) -> dict:
    """The F16's logits over the fixed text and its greedy output: what every quant is compared with."""
    tokens = quality_tokens(path, settings.threads)
    llm, _, _ = _open(path, [], n_ctx=settings.ctx, threads=settings.threads)
    try:
        greedy = _generate(llm, llm.tokenize(settings.prompt.encode()), settings.new_tokens)["tokens"]
    finally:
        llm.close()
    return {"path": path.name, "sha256": sha256, "tokens": tokens, "logits": logits(path, tokens, settings.threads),
            "text_sha256": hashlib.sha256(TEXT.encode()).hexdigest(), "greedy_tokens": greedy}


def default_placements() -> list[Placement]:
    # `gpu` (every layer offloaded) and `cpu-moe` on every build: on a CPU-only build both run on the
    # CPU, the backend is reported as CPU, and the override is still applied and checked.
    return [parse_placement("gpu"), parse_placement("cpu-moe")]


def run(target: Path, placements: list[Placement] | None = None, settings: Settings | None = None,
        reference: Path | None = None, status=lambda line: None) -> dict:
    """Smoke a GGUF file, or every artifact of an output directory (recording the results in its manifest)."""
    from datetime import datetime, timezone

    from . import manifest as mf
    from .libllama import backends, devices
    from .tools import versions

    settings = settings or Settings()
    placements = placements or default_placements()
    target = Path(target)
    manifest = mf.load(target) if target.is_dir() else mf.load_or_none(target.parent)
    if target.is_dir():
        if not manifest.artifacts:
            raise MoeprepError(f"the manifest in {target} lists no artifacts", "run `moeprep convert` first")
        out = target
        targets = [Target(out / a.path, a.quant, a.sha256) for a in manifest.artifacts]
    else:
        if not target.is_file():
            raise MoeprepError(f"{target} does not exist", "give a .gguf file or an output directory")
        out = target.parent
        known = manifest and next((a for a in manifest.artifacts if a.path == target.name), None)
        targets = [Target(target, known.quant if known else None, known.sha256 if known else None)]
    if reference is None and manifest is not None:
        base = next((a for a in manifest.artifacts if a.stage == "convert"), None)
        reference = out / base.path if base else None

    nvml, nvml_status = gpu.nvml()
    backend = backends([d for d in devices() if d["type"] != "CPU"]) or ["CPU"]
    ref = None
    if reference is not None:
        status(f"reference: {reference.name}")
        ref_sha = next((a.sha256 for a in manifest.artifacts if a.path == reference.name), None) if manifest else None
        ref = reference_for(reference, ref_sha, settings)
    results = {}
    for t in targets:
        _check_unchanged(t)
        results[t.path.name] = smoke_file(t, placements, settings, nvml, ref, status)
    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "+".join(backend),
        "nvml": nvml_status,
        "hardware": gpu.hardware(nvml),
        "tools": versions(),
        "settings": {"runs": settings.runs, "warmup_runs": 1, "ctx": settings.ctx, "new_tokens": settings.new_tokens,
                     "threads": settings.threads, "prompt": settings.prompt, "quality_tokens": QUALITY_TOKENS,
                     "quality_text_sha256": hashlib.sha256(TEXT.encode()).hexdigest(),
                     "placements": [p.name for p in placements]},
        "methods": METHODS,
        "artifacts": results,
    }
    if manifest is not None:
        manifest.smoke = _merge(manifest.smoke, report)
        mf.save(out, manifest)
    return report


def _check_unchanged(target: Target) -> None:
    """Results are recorded against a sha256, so the bytes measured must be the bytes the manifest lists."""
    from .files import sha256_file

    if target.sha256 is None:
        target.sha256 = sha256_file(target.path)
    elif sha256_file(target.path) != target.sha256:
        raise MoeprepError(f"{target.path} no longer matches the sha256 in its manifest",
                           "rerun `moeprep convert` to rebuild it, then smoke again")


def _merge(old: dict | None, new: dict) -> dict:
    """A smoke of one file updates that file's entry and keeps the others' (with their own settings)."""
    if not old or old.get("settings") != new["settings"] or old.get("hardware") != new["hardware"]:
        return new
    return {**new, "artifacts": {**old.get("artifacts", {}), **new["artifacts"]}}


METHODS = {
    "load_s": "wall time of llama_cpp.Llama(...) construction (model load + context creation)",
    "ttft_s": "wall time from the start of generation to the first streamed token id (prompt eval + first sample)",
    "decode_tps": "(generated token ids - 1) / wall time between the first and last streamed token",
    "decode_tps_llama": "llama_perf_context n_eval / t_eval_ms",
    "prompt_tps": "llama_perf_context n_p_eval / t_p_eval_ms",
    "degenerate": "a quant fails when one token repeats through half or more of its greedy output while the F16's "
                  "output on the same prompt neither does nor ends in one repeated token",
    "kld": "per-position KL(P_F16 || P_quant) over the fixed text, natural log, logits from one llama.cpp eval",
    "overridden": "llama.cpp log lines 'tensor … buffer type overridden to …' captured with llama_log_set",
    "buffers": "llama.cpp log lines '<device> model|KV|compute|output buffer size = X MiB'",
}
