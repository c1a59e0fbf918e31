"""Offload plan from the GGUF alone: predicted GPU memory per placement, every figure labelled a prediction.

Weights: the bytes of every tensor the override leaves on the GPU, token_embd excepted (llama.cpp always
keeps the input layer in host memory; see probe).

KV cache and compute buffer: sized by llama.cpp's own allocator, not by a formula. `simulate` loads the
model with `no_alloc` and creates a context as llama-server would (libllama.simulate_context): nothing is
read or allocated, and llama.cpp logs its KV caches (sliding-window layers at their window, recurrent state
included) and the compute buffer of its worst-case graph, in milliseconds.

Where the build has a GPU backend, each placement is simulated on it with its overrides, which includes what
CUDA stages for experts left on the CPU, and llama.cpp resolves flash attention `auto` itself. On a CPU-only
build the CPU backend sizes the graph for every placement at once; what differs on the CUDA build users run
is predicted by two rules, each checked against llama.cpp's own CUDA figures: flash attention `auto` as
ggml-cuda resolves it (`cuda_flash_attn`), and the staging of experts left in host memory (`_staged`).
`predict` without simulations falls back to a KV formula, leaves the compute buffer out, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moeprep.llama.context import DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_UBATCH
from moeprep.placement import Placement
from moeprep.records.probe import ProbeReport
from moeprep.records.results import FileResult, FlashAttn, PlanRecord, Simulation

COMPUTE_NOT_INCLUDED = "not included (depends on backend and n_ubatch; see measured values where a GPU smoke exists)"

# llama-server's defaults (common/common.h): n_batch 2048, n_ubatch 512, flash attention auto, f16 caches.

# ggml-cuda's offload_op: an op whose weight sits in host memory runs on the GPU (its weight copied over)
# when its batch is at least this many tokens; below it the op stays on the CPU and nothing is staged.
OP_OFFLOAD_MIN_BATCH = 32

# Smokes recorded before smoke kept what llama.cpp ran with (Runtime) used llama-cpp-python's context:
# n_batch min(512, ctx), n_ubatch 512, flash attention off.
LEGACY_SMOKE_UBATCH = 512

# Which K/V head sizes ggml-cuda has flash-attention kernels for at 0c1e570 (ggml/src/ggml-cuda/fattn.cu,
# ggml_cuda_get_best_fattn_kernel), which decides what `auto` resolves to on a CUDA build: where the kernel is
# missing the op falls back to the CPU and llama_context::resolve_fused_ops turns flash attention off.
CUDA_FA_HEADS = {40: 40, 64: 64, 72: 72, 80: 80, 96: 96, 112: 112, 128: 128, 256: 256}  # K head -> V head
CUDA_FA_GQA_HEADS = {192: (128, 8), 320: (256, 32), 512: (512, 1), 576: (512, 1)}  # K head -> (V head, GQA multiple)
CUDA_FA_CACHE_TYPES = {"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"}  # fattn_kv_type_supported
CUDA_FA_SOURCE = "ggml/src/ggml-cuda/fattn.cu, ggml_cuda_get_best_fattn_kernel, llama.cpp 0c1e570"

# What the rules were checked against, and their error there (tests/test_plan.py recomputes it): llama-fit-params
# on an H200 for the evidence model (8 blocks, 16 experts, F16 and Q4_K_M), CUDA0's model + KV + compute, in
# shared/gpu/evidence-2026-11-26-h200/run2/fit-matrix.txt (24 settings, flash attention off) and
# evidence-2026-12-04-h200-fa/fit-fa.txt (72 settings: ctx 4096/32768, ubatch 512/2048, gpu, cpu-moe and
# n-cpu-moe=2, flash attention on, off and auto). Percent, (lowest, highest).
EVIDENCE = "llama-fit-params on an H200 (96 settings, flash attention on, off and auto)"
EVIDENCE_ERRORS = {
    "simulated": (-2.2, 12.2),  # the CPU simulation's compute buffer against CUDA's (+4.5 MiB at ctx 512)
    "staging": (-9.1, 0.4),  # the staging rule's compute buffer, where it decides
    "total": (-3.6, 3.4),  # weights + KV + compute against CUDA0's model + KV + compute
}


def _range(name: str) -> str:
    low, high = EVIDENCE_ERRORS[name]
    return f"{low:+.1f} to {high:+.1f} %"


def kv_cache_bytes(report: ProbeReport, ctx: int) -> tuple[int, str]:
    """The KV cache by formula: the fallback where llama.cpp cannot size it (a layout it cannot load)."""
    a = report.attention
    layers = report.block_count
    if a.kv_lora_rank:
        rope = a.rope_dimension_count or 0
        per_token = layers * (a.kv_lora_rank + rope) * 2
        return ctx * per_token, (f"formula (llama.cpp could not size it): MLA latent cache, ctx {ctx} x {layers} "
                                 f"layers x (kv_lora_rank {a.kv_lora_rank} + rope {rope}) x 2 bytes")
    heads = a.head_count or 1
    kv_heads = a.head_count_kv or heads
    k_len = a.key_length or ((report.embedding_length or 0) // heads)
    v_len = a.value_length or k_len
    method = (f"formula (llama.cpp could not size it): f16 cache, ctx {ctx} x {layers} layers x {kv_heads} KV heads "
              f"x (K {k_len} + V {v_len}) x 2 bytes")
    if a.sliding_window and a.sliding_window < ctx:
        method += f"; sliding-window layers (window {a.sliding_window}) counted at full context, an upper bound"
    return ctx * layers * kv_heads * (k_len + v_len) * 2, method


def cuda_flash_attn(report: ProbeReport, cache_type_k: str = "f16", cache_type_v: str = "f16") -> tuple[bool, str]:
    """Whether a CUDA build resolves flash attention `auto` to on for this model, and why (CUDA_FA_SOURCE)."""
    a = report.attention
    heads = a.head_count or 1
    if a.kv_lora_rank:  # MLA: attention over the latent cache, one KV head
        k, v, gqa = a.kv_lora_rank + (a.rope_dimension_count or 0), a.kv_lora_rank, heads
    else:
        k = a.key_length or ((report.embedding_length or 0) // heads)
        v = a.value_length or k
        gqa = heads // (a.head_count_kv or heads)
    shape = f"K/V head size {k}/{v}"
    if cache_type_k not in CUDA_FA_CACHE_TYPES or cache_type_v not in CUDA_FA_CACHE_TYPES:
        return False, f"ggml-cuda has no flash-attention kernel for a {cache_type_k}/{cache_type_v} cache ({CUDA_FA_SOURCE})"
    if CUDA_FA_HEADS.get(k) == v:
        return True, f"{shape} has CUDA flash-attention kernels ({CUDA_FA_SOURCE})"
    if k in CUDA_FA_GQA_HEADS:
        need_v, multiple = CUDA_FA_GQA_HEADS[k]
        if v == need_v and gqa >= 2 and gqa % multiple == 0:
            return True, f"{shape} with GQA ratio {gqa} has CUDA flash-attention kernels ({CUDA_FA_SOURCE})"
    return False, f"{shape} (GQA ratio {gqa}) has no CUDA flash-attention kernel ({CUDA_FA_SOURCE})"


def expert_staging(report: ProbeReport, placement: Placement, n_ubatch: int) -> tuple[int, str | None]:
    """What CUDA's compute buffer holds for one expert matmul when experts stay in host memory.

    For ubatches of OP_OFFLOAD_MIN_BATCH tokens or more, ggml-cuda runs the expert matmuls on the GPU and the
    scheduler copies each host expert tensor into the GPU's compute buffer; it starts a new split per such
    weight so that one copy is freed before the next (ggml-backend.cpp, "the memory of the previously
    offloaded weights can be reused"). So the buffer holds the largest moved expert tensor of a layer while
    that layer's MoE activations are live: the FFN input and residual (n_embd each) and the gate and up
    outputs (n_expert_used x their rows), f32, per token of the ubatch.
    """
    if n_ubatch < OP_OFFLOAD_MIN_BATCH:
        return 0, None
    patterns = [re.compile(p) for p in placement.patterns]
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


def kq_mask_bytes(sim: Simulation) -> int:
    """The attention mask llama.cpp feeds every layer: n_kv x n_ubatch, f16 with flash attention and f32 without
    (build_attn_inp_kq_mask in src/llama-graph.cpp). The worst-case graph has n_kv = n_ctx."""
    return sim.n_ctx * sim.n_ubatch * (2 if sim.flash_attn is FlashAttn.ON else 4)


def _staged(report: ProbeReport, placement: Placement, sim: Simulation) -> tuple[int, str]:
    """CUDA's compute buffer for a placement with experts in host memory, from a CPU-only simulation.

    Fitted to the H200 rows (EVIDENCE) by this account of them: the graph is split at every expert matmul, and
    the largest split is either the staging of one expert (expert_staging, with the attention mask, which is
    live there) or the rest of the graph. The CPU backend sizes one unsplit graph, in which the mask is live
    until the output layer; with flash attention on, that output layer is the peak (the logits of a whole
    ubatch), and in the split graph it no longer holds the mask. Without flash attention the attention scores
    are the peak, and the mask is live there in either graph.
    """
    staged, why = expert_staging(report, placement, sim.n_ubatch)
    simulated = f"simulated on {sim.device}"
    if not staged:
        return sim.compute, simulated
    mask = kq_mask_bytes(sim)
    rest, rest_method = sim.compute, simulated
    if sim.flash_attn is FlashAttn.ON:
        rest = sim.compute - mask
        rest_method = (f"CUDA expert staging rule, the rest of the graph: {simulated}, less the KQ mask "
                       f"({mask / 2**20:.1f} MiB), which the split graph's peak does not hold")
    if staged + mask > rest:
        return staged + mask, f"CUDA expert staging rule, one expert's split: {why}, + the KQ mask {mask / 2**20:.1f} MiB"
    return rest, rest_method


@dataclass
class Measured:
    """llama.cpp's GPU buffers from a recorded smoke of the same bytes."""

    model: float
    kv: float
    compute: float


@dataclass
class PlanRow:
    placement: Placement
    weights_on_gpu: int
    kv_cache: int
    predicted_total: int  # weights + KV cache + compute buffer (the compute buffer only where it was predicted)
    fits: bool | None
    measured: Measured | None = None
    weights_error_pct: float | None = None
    compute: int | None = None  # None: not predicted (see Plan.compute_buffer)
    compute_method: str | None = None
    flash_attn: FlashAttn | None = None  # the flash attention state the compute figure is for
    compute_by_flash_attn: dict[str, int] = field(default_factory=dict)  # on and off, whichever runs
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
    flash_attn: FlashAttn = DEFAULT_FLASH_ATTN  # as asked: auto, on or off
    flash_attn_used: FlashAttn | None = None  # what runs: `auto` resolved, on and off as asked
    flash_attn_note: str | None = None  # how `auto` was resolved, and by whom
    n_ctx: int | None = None  # as llama.cpp applies them, where simulated
    n_batch: int | None = None
    n_ubatch: int | None = None
    simulations: list[Simulation] = field(default_factory=list)
    measured_note: str | None = None  # what a recorded smoke can be compared with
    cache_type: str = "f16"  # the K and V cache type (llama-server's -ctk/-ctv)


def resolve_flash_attn(report: ProbeReport, asked: FlashAttn, sims: list[Simulation],
                       cache_type: str = "f16") -> tuple[FlashAttn, str]:
    """What flash attention runs as on the CUDA build users run, and how that was decided."""
    if asked is not FlashAttn.AUTO:
        return asked, f"flash attention {asked}, as asked"
    resolved = next((s for s in sims if s.asked is FlashAttn.AUTO), None)
    if resolved is not None:
        return resolved.flash_attn, f"flash attention auto: llama.cpp resolved it to {resolved.flash_attn} on {resolved.device}"
    on, why = cuda_flash_attn(report, cache_type, cache_type)
    state = FlashAttn.ON if on else FlashAttn.OFF
    return state, (f"flash attention auto: predicted {state} for a CUDA build, as llama_context::resolve_fused_ops "
                   f"resolves it: {why}; this build has no GPU backend to ask. The figure for the other state is in "
                   f"compute_by_flash_attn; --flash-attn on|off picks one")


def predict(report: ProbeReport, ctx: int = 4096, vram: int | None = None, smoke: FileResult | None = None, *,
            simulations: list[Simulation] | None = None, batch: int = DEFAULT_BATCH, ubatch: int = DEFAULT_UBATCH,
            flash_attn: FlashAttn | str = DEFAULT_FLASH_ATTN, smoke_ctx: int | None = None,
            compute_not_included: str = COMPUTE_NOT_INCLUDED, cache_type: str = "f16") -> Plan:
    """The plan for a probed file, with a `cache_type` K and V cache (llama-server's -ctk/-ctv).

    `simulations` are llama.cpp's sizings of this file's context (see `simulate`); without them the KV cache is
    a formula, the compute buffer is left out and `compute_not_included` says why. `smoke` is a recorded smoke
    of exactly that file, if any, made at ctx `smoke_ctx`.
    """
    asked = FlashAttn(flash_attn)
    sims = [s for s in simulations or [] if s.asked is not FlashAttn.AUTO]
    n_ctx = sims[0].n_ctx if sims else ctx
    if sims:
        kv, kv_method = sims[0].kv, f"llama.cpp's allocator (no_alloc): {sims[0].kv_method}"
    else:
        kv, kv_method = kv_cache_bytes(report, n_ctx)
    if n_ctx != ctx:
        kv_method += f" (llama.cpp rounds ctx {ctx} up to {n_ctx})"
    plan = Plan(report.file, ctx, vram, report.bytes["total"], report.bytes["input_layer"], kv_method, report.is_moe,
                batch=batch, ubatch=ubatch, flash_attn=asked, simulations=list(simulations or []), cache_type=cache_type)
    if sims:
        plan.n_ctx, plan.n_batch, plan.n_ubatch = n_ctx, sims[0].n_batch, sims[0].n_ubatch
        plan.compute_buffer = _compute_method(sims, report.is_moe)
        plan.flash_attn_used, plan.flash_attn_note = resolve_flash_attn(report, asked, simulations or [], cache_type)
        if cache_type not in ("f16", "f32", "bf16") and plan.flash_attn_used is FlashAttn.OFF:
            plan.compute_buffer = (f"not predicted: a {cache_type} V cache needs flash attention, and it runs off here "
                                   f"({plan.flash_attn_note}): llama.cpp refuses such a context")
            plan.flash_attn_used = None
    else:
        plan.compute_buffer = compute_not_included
    for p in report.placements:
        row = PlanRow(p.name, p.bytes_on_gpu, kv, p.bytes_on_gpu + kv, None)
        if plan.flash_attn_used and (mine := [s for s in sims if s.placement in (None, p.name)]):
            _predict_compute(row, report, mine, plan.flash_attn_used)
            row.predicted_total += row.compute or 0
        row.fits = (row.predicted_total <= vram) if vram else None
        measured = smoke.placements.get(p.name) if smoke else None
        if measured and measured.gpu_bytes():
            _compare(row, measured, _smoke_ran(measured, smoke_ctx), plan)
        plan.rows.append(row)
    if smoke and any(r.measured for r in plan.rows):
        first = next(smoke.placements[r.placement] for r in plan.rows if r.measured)
        plan.measured_note = _measured_note(plan, _smoke_ran(first, smoke_ctx))
    if vram:
        fitting = sorted((r for r in plan.rows if r.fits), key=lambda r: r.placement.order)
        plan.recommended = fitting[0].placement if fitting else None
    return plan


def _predict_compute(row: PlanRow, report: ProbeReport, sims: list[Simulation], used: FlashAttn) -> None:
    """The row's compute buffer in each flash attention state simulated (a CPU-only simulation with the CUDA
    staging rule applied), and the one for the state that runs."""
    methods = {}
    for s in sims:
        figure, method = (_staged(report, row.placement, s) if s.placement is None and s.device == "CPU"
                          else (s.compute, f"simulated on {s.device}"))
        row.compute_by_flash_attn[str(s.flash_attn)] = figure
        methods[s.flash_attn] = method
    if str(used) in row.compute_by_flash_attn:
        row.flash_attn = used
        row.compute = row.compute_by_flash_attn[str(used)]
        row.compute_method = f"flash attention {used}: {methods[used]}"


def _compute_method(sims: list[Simulation], is_moe: bool) -> str:
    s = sims[0]
    text = (f"PREDICTED by llama.cpp's own allocator: model loaded with no_alloc (nothing read or allocated), "
            f"context created as llama-server creates it at n_ctx {s.n_ctx}, n_batch {s.n_batch}, n_ubatch "
            f"{s.n_ubatch}. ")
    if s.device != "CPU":
        return text + f"Each placement simulated on {s.device} with its overrides, CUDA's expert staging included."
    text += (f"No GPU backend in this build, so the CPU backend sized the graph for the GPU (against CUDA in "
             f"{EVIDENCE}: {_range('simulated')}).")
    if is_moe:
        text += (f" Experts on the CPU: CUDA copies each moved expert tensor into the compute buffer for its matmul "
                 f"(ubatches of {OP_OFFLOAD_MIN_BATCH}+ tokens), one at a time, in a graph split at each; predicted "
                 f"as the larger of that staging (the largest moved expert tensor, one ubatch's MoE activations and "
                 f"the KQ mask) and the rest of the graph, a rule fitted to those CUDA figures ({_range('staging')}).")
    return text + f" GPU totals there: {_range('total')}."


def _smoke_ran(measured, smoke_ctx: int | None) -> tuple[int, int, FlashAttn | None] | None:
    """(n_ctx, n_ubatch, flash attention) that a recorded smoke's placement ran with."""
    rt = getattr(measured, "runtime", None)
    if rt is not None and rt.n_ctx and rt.n_ubatch:
        return rt.n_ctx, rt.n_ubatch, rt.flash_attn_ran
    if smoke_ctx:  # recorded before smoke kept its Runtime: llama-cpp-python's context, flash attention off
        return -(-smoke_ctx // 256) * 256, min(LEGACY_SMOKE_UBATCH, smoke_ctx), FlashAttn.OFF
    return None


def _compare(row: PlanRow, measured, ran: tuple[int, int, FlashAttn | None] | None, plan: Plan) -> None:
    """Errors against a smoke of the same bytes: weights always; KV at the same n_ctx; compute and total at the
    same n_ctx and n_ubatch, against the figure for the flash attention state the smoke ran with."""
    gpu = measured.gpu_bytes()
    row.measured = Measured(gpu["model"], gpu["KV"], gpu["compute"])
    row.weights_error_pct = _error(row.weights_on_gpu, gpu["model"])
    if not plan.simulations or ran is None or ran[0] != plan.n_ctx:
        return
    row.kv_error_pct = _error(row.kv_cache, gpu["KV"])
    compute = row.compute_by_flash_attn.get(str(ran[2]))
    if ran[1] == plan.n_ubatch and compute is not None:
        row.compute_error_pct = _error(compute, gpu["compute"])
        row.total_error_pct = _error(row.weights_on_gpu + row.kv_cache + compute, sum(gpu.values()))


def _measured_note(plan: Plan, ran: tuple[int, int, FlashAttn | None] | None) -> str:
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


# The contexts every file is planned at where it is made, for the card's tier table and offload plan: 4k, 16k, 32k
# and the model's trained maximum (tiers.contexts_for), at llama-server's batches and f16 caches.
CONTEXTS = (4096, 16384, 32768)
CARD_CTX = 4096  # the card's offload plan


def contexts_for(trained: int | None, asked: list[int] | None = None) -> list[int]:
    """The asked contexts (default 4k, 16k, 32k) no longer than the trained maximum, which is added."""
    chosen = [c for c in (asked or CONTEXTS) if not trained or c <= trained]
    if trained and trained not in chosen:
        chosen.append(trained)
    return sorted(set(chosen))


def from_record(report: ProbeReport, rec: PlanRecord, vram: int | None = None, smoke: FileResult | None = None,
                smoke_ctx: int | None = None, flash_attn: FlashAttn | str = DEFAULT_FLASH_ATTN) -> Plan:
    """The plan a record makes: the same computation as `plan_file`, from the sizings kept in the manifest."""
    return predict(report, rec.ctx, vram, smoke, simulations=rec.simulations, batch=rec.n_batch, ubatch=rec.n_ubatch,
                   flash_attn=flash_attn, smoke_ctx=smoke_ctx, cache_type=rec.cache_type,
                   compute_not_included=f"not included: {rec.why_not}" if rec.why_not else COMPUTE_NOT_INCLUDED)


