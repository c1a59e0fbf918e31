"""Offload plan from the GGUF alone: predicted GPU memory per placement, every figure labelled a prediction.

Weights: the bytes of every tensor the override leaves on the GPU, token_embd excepted (llama.cpp
always keeps the input layer in host memory; see probe). KV cache: n_ctx x layers x KV heads x (K + V head
size) x 2 bytes (f16 cache), or the compressed latent for MLA models, at the n_ctx llama.cpp applies (it
rounds the context up to a multiple of 256).

Compute buffer: sized by llama.cpp's own allocator, not by a formula. `simulate` loads the model with
`no_alloc` and creates a context (libllama.simulate_context): nothing is read or allocated, and llama.cpp
logs the compute buffer of its worst-case graph, in milliseconds. Where the build has a GPU backend, each
placement is simulated on it with its overrides, which includes what CUDA stages for experts left on the
CPU. On a CPU-only build the CPU backend sizes the graph for every placement at once, and that staging is
added by a rule (`expert_staging`), checked against the recorded CUDA figures. `predict` without
simulations leaves the compute buffer out and says so.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest as mf
from .placement import Placement as Spec
from .probe import ProbeReport, probe
from .results import Buffer, FileResult

COMPUTE_NOT_INCLUDED = "not included (depends on backend and n_ubatch; see measured values where a GPU smoke exists)"

# llama-server's defaults (common/common.h): n_batch 2048, n_ubatch 512, flash attention auto.
DEFAULT_BATCH, DEFAULT_UBATCH, DEFAULT_FLASH_ATTN = 2048, 512, "auto"

# ggml-cuda's offload_op: an op whose weight sits in host memory runs on the GPU (its weight copied over)
# when its batch is at least this many tokens; below it the op stays on the CPU and nothing is staged.
OP_OFFLOAD_MIN_BATCH = 32

# Smokes recorded before smoke kept what llama.cpp ran with (Runtime) used llama-cpp-python's context:
# n_batch min(512, ctx), n_ubatch 512, flash attention off.
LEGACY_SMOKE_UBATCH = 512

# What the methods below were checked against, and their error there (tests/test_plan.py recomputes it):
# CUDA0 buffers from llama-fit-params on an H200, 2026-11-26 (shared/gpu/evidence-2026-11-26-h200/run2/
# fit-matrix.txt), for an 8-block, 16-expert Phi-MoE in F16 and Q4_K_M at ctx 512/4096/32768 and n_ubatch 512/2048,
# gpu and cpu-moe, flash attention off (that build has no FA kernels). Percent, (lowest, highest).
EVIDENCE = "the 2026-11-26 H200 evidence (llama-fit-params on CUDA, 24 settings)"
EVIDENCE_ERRORS = {
    "simulated": (-2.2, 12.2),  # the CPU simulation's compute buffer against CUDA's (+4.5 MiB at ctx 512)
    "staging": (-7.7, -1.0),  # the staging rule's compute buffer, where it is the larger
    "total": (-3.8, 3.4),  # weights + KV + compute against CUDA0's model + KV + compute
}


def _range(name: str) -> str:
    low, high = EVIDENCE_ERRORS[name]
    return f"{low:+.1f} to {high:+.1f} %"


def kv_cache_bytes(report: ProbeReport, ctx: int) -> tuple[int, str]:
    a = report.attention
    layers = report.block_count
    if a.kv_lora_rank:
        rope = a.rope_dimension_count or 0
        per_token = layers * (a.kv_lora_rank + rope) * 2
        return ctx * per_token, (f"MLA latent cache: ctx {ctx} x {layers} layers x (kv_lora_rank {a.kv_lora_rank} "
                                 f"+ rope {rope}) x 2 bytes")
    heads = a.head_count or 1
    kv_heads = a.head_count_kv or heads
    k_len = a.key_length or ((report.embedding_length or 0) // heads)
    v_len = a.value_length or k_len
    method = f"f16 cache: ctx {ctx} x {layers} layers x {kv_heads} KV heads x (K {k_len} + V {v_len}) x 2 bytes"
    if a.sliding_window and a.sliding_window < ctx:
        method += f"; sliding-window layers (window {a.sliding_window}) counted at full context, an upper bound"
    return ctx * layers * kv_heads * (k_len + v_len) * 2, method


@dataclass
class Simulation:
    """One context llama.cpp sized with nothing allocated (model param no_alloc), as it logged it."""

    device: str  # whose compute buffer stands for the GPU's: "CUDA0", ..., or "CPU" on a build without a GPU
    placement: str | None  # simulated with this placement's overrides; None: one run for every placement
    flash_attn: str  # "on" or "off", as llama.cpp applied it
    n_ctx: int  # as llama.cpp applied them (n_ctx rounded up, n_batch and n_ubatch clamped)
    n_batch: int
    n_ubatch: int
    compute: int  # bytes of the compute buffer on `device`
    buffers: list[Buffer] = field(default_factory=list)  # every compute buffer logged, host ones included
    seconds: float = 0.0


def read_simulation(text: str, placement: str | None, seconds: float = 0.0) -> Simulation:
    """The applied context settings and the compute buffers in a llama.cpp context-creation log."""
    from .smoke import parse_log

    log = parse_log(text)
    compute = [b for b in log.buffers if b.kind == "compute"]
    if not compute or not {"n_ctx", "n_batch", "n_ubatch"} <= log.context.keys():
        raise ValueError("no context was created: the log has no compute buffer or context settings")
    on_gpu = [b for b in compute if b.on_gpu]
    counted = on_gpu or [b for b in compute if b.device == "CPU"]
    fa = log.context.get("flash_attn")
    if fa == "auto" and log.flash_attn_used is not None:
        fa = "enabled" if log.flash_attn_used else "disabled"
    return Simulation(
        device="+".join(sorted({b.device for b in counted})),
        placement=placement,
        flash_attn={"enabled": "on", "disabled": "off"}.get(fa or "", fa or "unknown"),
        n_ctx=int(log.context["n_ctx"]),
        n_batch=int(log.context["n_batch"]),
        n_ubatch=int(log.context["n_ubatch"]),
        compute=round(sum(b.mib for b in counted) * 2**20),
        buffers=compute,
        seconds=seconds,
    )


def simulate(path: Path, report: ProbeReport, *, ctx: int, ubatch: int = DEFAULT_UBATCH, batch: int = DEFAULT_BATCH,
             flash_attn: str = DEFAULT_FLASH_ATTN) -> list[Simulation]:
    """Let llama.cpp size the compute buffer of `path` for these settings, without allocating anything.

    With a GPU backend, every placement is simulated on it with its overrides and llama.cpp resolves flash
    attention `auto` itself. On the CPU backend the overrides change nothing (every buffer is host memory),
    so one run serves every placement; `auto` is simulated both ways, since the user's GPU build decides.
    """
    from .errors import MoeprepError
    from .libllama import devices, simulate_context

    on_gpu = any(d["type"] in ("GPU", "IGPU") for d in devices())
    if on_gpu:
        runs = [(p.name, p.patterns, flash_attn) for p in report.placements]
    else:
        runs = [(None, [], fa) for fa in (("on", "off") if flash_attn == "auto" else (flash_attn,))]
    out = []
    for name, patterns, fa in runs:
        start = time.perf_counter()
        text = simulate_context(path, patterns=patterns, n_ctx=ctx, n_batch=batch, n_ubatch=ubatch, flash_attn=fa)
        try:
            out.append(read_simulation(text, name, time.perf_counter() - start))
        except ValueError as e:
            raise MoeprepError(f"llama.cpp sized no context for {Path(path).name}: {e}",
                               "run with --debug and report it as a moeprep bug") from e
    return out


def expert_staging(report: ProbeReport, placement: str, n_ubatch: int) -> tuple[int, str | None]:
    """What CUDA's compute buffer holds when experts stay in host memory, estimated for CPU-only simulations.

    For ubatches of OP_OFFLOAD_MIN_BATCH tokens or more, ggml-cuda runs the expert matmuls on the GPU and the
    scheduler copies each host expert tensor into the GPU's compute buffer; it starts a new split per such
    weight so that one copy is freed before the next (ggml-backend.cpp, "the memory of the previously
    offloaded weights can be reused"). So the buffer holds the largest moved expert tensor of a layer while
    that layer's MoE activations are live: the FFN input and residual (n_embd each) and the gate and up
    outputs (n_expert_used x their rows), f32, per token of the ubatch. Where the allocator fragments around
    the copy the real buffer is somewhat larger (EVIDENCE_ERRORS["staging"]).
    """
    if n_ubatch < OP_OFFLOAD_MIN_BATCH:
        return 0, None
    patterns = [re.compile(p) for p in Spec(placement).patterns]
    best, why = 0, None
    for layer in report.layers:
        moved = [t for t in layer.experts if any(p.search(t.name) for p in patterns)]
        if not moved:
            continue
        largest = max(moved, key=lambda t: t.bytes)
        gate_up = [t for t in layer.experts if re.search(r"\.ffn_(gate|up|gate_up)_(ch|)exps\.weight$", t.name)]
        n_embd = report.embedding_length or (gate_up[0].shape[0] if gate_up else 0)
        rows = sum(t.shape[1] for t in gate_up if len(t.shape) > 1)
        per_token = 4 * (2 * n_embd + report.expert_used_count * rows)
        staged = largest.bytes + n_ubatch * per_token
        if staged > best:
            best = staged
            why = (f"{largest.name} ({largest.bytes / 2**20:.1f} MiB {largest.type}) staged + MoE activations "
                   f"n_ubatch {n_ubatch} x 4 B x (2 x n_embd {n_embd} + n_expert_used {report.expert_used_count} "
                   f"x gate/up rows {rows}) = {n_ubatch * per_token / 2**20:.1f} MiB")
    return best, why


@dataclass
class Measured:
    """llama.cpp's GPU buffers from a recorded smoke of the same bytes."""

    model: float
    kv: float
    compute: float


@dataclass
class PlanRow:
    placement: str
    weights_on_gpu: int
    kv_cache: int
    predicted_total: int  # weights + KV cache + compute buffer (the compute buffer only where it was predicted)
    fits: bool | None
    measured: Measured | None = None
    weights_error_pct: float | None = None
    compute: int | None = None  # None: not predicted (see Plan.compute_buffer)
    compute_method: str | None = None
    flash_attn: str | None = None  # the flash attention state the compute figure is for
    compute_by_flash_attn: dict[str, int] = field(default_factory=dict)
    kv_error_pct: float | None = None
    compute_error_pct: float | None = None  # against a smoke at the same n_ctx, n_ubatch and flash attention
    total_error_pct: float | None = None


@dataclass
class Plan:
    file: str
    ctx: int
    vram: int | None
    weights_total: int
    token_embd_on_cpu: int
    kv_cache_method: str
    is_moe: bool
    rows: list[PlanRow] = field(default_factory=list)
    recommended: str | None = None
    kind: str = "prediction"
    compute_buffer: str = COMPUTE_NOT_INCLUDED  # how the compute buffer was predicted, or why it was not
    batch: int = DEFAULT_BATCH
    ubatch: int = DEFAULT_UBATCH
    flash_attn: str = DEFAULT_FLASH_ATTN  # as asked: auto, on or off
    flash_attn_note: str | None = None  # what `auto` became, and why
    n_ctx: int | None = None  # as llama.cpp applies them, where simulated
    n_batch: int | None = None
    n_ubatch: int | None = None
    simulations: list[Simulation] = field(default_factory=list)
    measured_note: str | None = None  # what a recorded smoke can be compared with


def predict(report: ProbeReport, ctx: int = 4096, vram: int | None = None, smoke: FileResult | None = None, *,
            simulations: list[Simulation] | None = None, batch: int = DEFAULT_BATCH, ubatch: int = DEFAULT_UBATCH,
            flash_attn: str = DEFAULT_FLASH_ATTN, smoke_ctx: int | None = None,
            compute_not_included: str = COMPUTE_NOT_INCLUDED) -> Plan:
    """The plan for a probed file.

    `simulations` are llama.cpp's sizings of this file's context (see `simulate`); without them the compute
    buffer is left out and `compute_not_included` says why. `smoke` is a recorded smoke of exactly that
    file, if any, made at ctx `smoke_ctx`.
    """
    sims = simulations or []
    n_ctx = sims[0].n_ctx if sims else ctx
    kv, kv_method = kv_cache_bytes(report, n_ctx)
    if n_ctx != ctx:
        kv_method += f" (llama.cpp rounds ctx {ctx} up to {n_ctx})"
    plan = Plan(report.file, ctx, vram, report.bytes["total"], report.bytes["input_layer"], kv_method, report.is_moe,
                batch=batch, ubatch=ubatch, flash_attn=flash_attn, simulations=sims)
    if sims:
        plan.n_ctx, plan.n_batch, plan.n_ubatch = n_ctx, sims[0].n_batch, sims[0].n_ubatch
        plan.compute_buffer = _compute_method(sims, report.is_moe)
        plan.flash_attn_note = _flash_attn_note(sims, flash_attn)
    else:
        plan.compute_buffer = compute_not_included
    for p in report.placements:
        row = PlanRow(p.name, p.bytes_on_gpu, kv, p.bytes_on_gpu + kv, None)
        if mine := [s for s in sims if s.placement in (None, p.name)]:
            _predict_compute(row, report, mine)
            row.predicted_total += row.compute
        row.fits = (row.predicted_total <= vram) if vram else None
        measured = smoke.placements.get(p.name) if smoke else None
        if measured and measured.gpu_bytes():
            _compare(row, measured, _smoke_ran(measured, smoke_ctx), plan)
        plan.rows.append(row)
    if smoke and any(r.measured for r in plan.rows):
        first = next(smoke.placements[r.placement] for r in plan.rows if r.measured)
        plan.measured_note = _measured_note(plan, _smoke_ran(first, smoke_ctx))
    if vram:
        fitting = sorted((r for r in plan.rows if r.fits), key=lambda r: Spec(r.placement).order)
        plan.recommended = fitting[0].placement if fitting else None
    return plan


def _predict_compute(row: PlanRow, report: ProbeReport, sims: list[Simulation]) -> None:
    """The row's compute buffer: per flash attention state simulated, the larger of llama.cpp's figure and,
    on a CPU-only simulation, the staging of experts left on the CPU; then the larger over the states."""
    methods = {}
    for s in sims:
        figure, method = s.compute, f"simulated on {s.device}"
        if s.placement is None and s.device == "CPU":
            staged, why = expert_staging(report, row.placement, s.n_ubatch)
            if staged > figure:
                figure, method = staged, f"CUDA expert staging (larger than the {s.compute / 2**20:.1f} MiB simulated): {why}"
        if figure >= row.compute_by_flash_attn.get(s.flash_attn, -1):
            row.compute_by_flash_attn[s.flash_attn] = figure
            methods[s.flash_attn] = method
    row.flash_attn = max(row.compute_by_flash_attn, key=lambda fa: (row.compute_by_flash_attn[fa], fa == "off"))
    row.compute = row.compute_by_flash_attn[row.flash_attn]
    row.compute_method = f"flash attention {row.flash_attn}: {methods[row.flash_attn]}"


def _compute_method(sims: list[Simulation], is_moe: bool) -> str:
    s = sims[0]
    text = (f"PREDICTED by llama.cpp's own allocator: model loaded with no_alloc (nothing read or allocated), "
            f"context created at n_ctx {s.n_ctx}, n_batch {s.n_batch}, n_ubatch {s.n_ubatch}. ")
    if s.device != "CPU":
        return text + f"Each placement simulated on {s.device} with its overrides, CUDA's expert staging included."
    text += (f"No GPU backend in this build, so the CPU backend sized the graph for the GPU (against CUDA in "
             f"{EVIDENCE}: {_range('simulated')}).")
    if is_moe:
        text += (f" Experts on the CPU: CUDA copies each moved expert tensor into the compute buffer for its matmul "
                 f"(ubatches of {OP_OFFLOAD_MIN_BATCH}+ tokens), one at a time; predicted as the larger of the "
                 f"simulation and the largest moved expert tensor + one ubatch's MoE activations ({_range('staging')}).")
    return text + f" GPU totals there: {_range('total')}."


def _flash_attn_note(sims: list[Simulation], asked: str) -> str:
    states = sorted({s.flash_attn for s in sims})
    if asked != "auto":
        return f"flash attention {asked}, as asked"
    if len(states) > 1:
        return ("flash attention auto: llama.cpp turns it on where the GPU backend has the kernel and off where not "
                "(the evidence's CUDA build had none); a CPU-only build cannot tell, so both were simulated and each "
                "placement shows the larger (both are in compute_by_flash_attn); --flash-attn on|off picks one")
    return f"flash attention auto: llama.cpp resolved it to {states[0]} on {sims[0].device}"


def _smoke_ran(measured, smoke_ctx: int | None) -> tuple[int, int, str | None] | None:
    """(n_ctx, n_ubatch, flash attention on/off) that a recorded smoke's placement ran with."""
    rt = getattr(measured, "runtime", None)
    if rt is not None and rt.n_ctx and rt.n_ubatch:
        fa = {"enabled": "on", "disabled": "off"}.get(rt.flash_attn or "")
        if rt.flash_attn == "auto" and rt.flash_attn_used is not None:
            fa = "on" if rt.flash_attn_used else "off"
        return rt.n_ctx, rt.n_ubatch, fa
    if smoke_ctx:  # recorded before smoke kept its Runtime: llama-cpp-python's context, flash attention off
        return -(-smoke_ctx // 256) * 256, min(LEGACY_SMOKE_UBATCH, smoke_ctx), "off"
    return None


def _compare(row: PlanRow, measured, ran: tuple[int, int, str | None] | None, plan: Plan) -> None:
    """Errors against a smoke of the same bytes: weights always; KV at the same n_ctx; compute and total at the
    same n_ctx and n_ubatch, against the figure for the flash attention state the smoke ran with."""
    gpu = measured.gpu_bytes()
    row.measured = Measured(gpu["model"], gpu["KV"], gpu["compute"])
    row.weights_error_pct = _error(row.weights_on_gpu, gpu["model"])
    if not plan.simulations or ran is None or ran[0] != plan.n_ctx:
        return
    row.kv_error_pct = _error(row.kv_cache, gpu["KV"])
    compute = row.compute_by_flash_attn.get(ran[2] or "")
    if ran[1] == plan.n_ubatch and compute is not None:
        row.compute_error_pct = _error(compute, gpu["compute"])
        row.total_error_pct = _error(row.weights_on_gpu + row.kv_cache + compute, sum(gpu.values()))


def _measured_note(plan: Plan, ran: tuple[int, int, str | None] | None) -> str:
    if ran is None:
        return "recorded GPU smoke: weights compared (its context settings are unknown)"
    where = f"recorded GPU smoke (n_ctx {ran[0]}, n_ubatch {ran[1]}, flash attention {ran[2] or '?'})"
    if not plan.simulations:
        return f"{where}: weights compared; the compute buffer was not predicted"
    if ran[0] != plan.n_ctx:
        return f"{where}: weights compared; KV and compute only at the smoke's n_ctx (plan: {plan.n_ctx})"
    if ran[1] != plan.n_ubatch:
        return f"{where}: weights and KV compared; compute only at the smoke's n_ubatch (plan: {plan.n_ubatch})"
    return f"{where}: weights, KV, compute (the flash attention {ran[2]} figure) and total compared"


def _error(predicted: float, measured: float) -> float | None:
    return 100 * (predicted - measured) / measured if measured else None


def plan_file(path: Path, ctx: int = 4096, vram: int | None = None, *, ubatch: int = DEFAULT_UBATCH,
              batch: int = DEFAULT_BATCH, flash_attn: str = DEFAULT_FLASH_ATTN, simulate_compute: bool = True) -> Plan:
    """Plan a GGUF file; where its directory's manifest records it, use that probe and any GPU smoke of it.

    The compute buffer is sized by llama.cpp itself (`simulate`) unless `simulate_compute` is off.
    """
    from .errors import MoeprepError

    path = Path(path)
    manifest = mf.load_or_none(path.parent) if path.is_file() else None
    artifact = manifest.artifact_at(path.name) if manifest else None
    known = artifact is not None and _unchanged(path, artifact)
    # a format 1 manifest's probe lacks the attention shape the KV cache follows from: read the header again
    recorded = artifact.probe if known and artifact.probe and artifact.probe.attention.head_count else None
    report = recorded or probe(path)
    smoke = manifest.smoke_result(artifact) if known else None  # a smoke of other bytes answers for nothing here
    smoke_ctx = manifest.smoke.settings.ctx if smoke and manifest.smoke else None
    sims, why = [], COMPUTE_NOT_INCLUDED
    if not simulate_compute:
        why = "not included (not simulated)"
    elif not report.loadable:
        why = "not included: current llama.cpp cannot load this layout, so it cannot size the compute buffer"
    else:
        try:
            sims = simulate(path, report, ctx=ctx, ubatch=ubatch, batch=batch, flash_attn=flash_attn)
        except MoeprepError as e:
            why = f"not included: {e.message}"
    return predict(report, ctx, vram, smoke, simulations=sims, batch=batch, ubatch=ubatch, flash_attn=flash_attn,
                   smoke_ctx=smoke_ctx, compute_not_included=why)


def _unchanged(path: Path, artifact: mf.Artifact) -> bool:
    # Size, not sha256: hashing an 80 GB file to plan it would take a minute; a file rewritten since it was
    # recorded almost always changes size, and is then probed afresh.
    return path.stat().st_size == artifact.size
