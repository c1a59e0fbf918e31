"""Offload plan from the GGUF alone: predicted GPU memory per placement, labelled as a prediction.

Weights: the bytes of every tensor the override leaves on the GPU, token_embd excepted (llama.cpp
always keeps the input layer in host memory; see probe). KV cache: n_ctx x layers x KV heads x (K + V head
size) x 2 bytes (f16 cache), or the compressed latent for MLA models. The compute buffer depends
on the backend and n_ubatch and is not predicted: it is stated as not included, and shown as
measured where a GPU smoke recorded it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import manifest as mf
from .placement import Placement as Spec
from .probe import ProbeReport, probe
from .results import FileResult

COMPUTE_NOT_INCLUDED = "not included (depends on backend and n_ubatch; see measured values where a GPU smoke exists)"


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
    predicted_total: int
    fits: bool | None
    measured: Measured | None = None
    weights_error_pct: float | None = None


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
    compute_buffer: str = COMPUTE_NOT_INCLUDED


def predict(report: ProbeReport, ctx: int = 4096, vram: int | None = None, smoke: FileResult | None = None) -> Plan:
    """The plan for a probed file; `smoke` is a recorded smoke of exactly that file, if any."""
    kv, kv_method = kv_cache_bytes(report, ctx)
    plan = Plan(report.file, ctx, vram, report.bytes["total"], report.bytes["input_layer"], kv_method, report.is_moe)
    for p in report.placements:
        row = PlanRow(p.name, p.bytes_on_gpu, kv, p.bytes_on_gpu + kv, (p.bytes_on_gpu + kv <= vram) if vram else None)
        measured = smoke.placements.get(p.name) if smoke else None
        gpu = measured.gpu_bytes() if measured else {}
        if gpu:
            row.measured = Measured(gpu["model"], gpu["KV"], gpu["compute"])
            row.weights_error_pct = 100 * (row.weights_on_gpu - gpu["model"]) / gpu["model"] if gpu["model"] else None
        plan.rows.append(row)
    if vram:
        fitting = sorted((r for r in plan.rows if r.fits), key=lambda r: Spec(r.placement).order)
        plan.recommended = fitting[0].placement if fitting else None
    return plan


def plan_file(path: Path, ctx: int = 4096, vram: int | None = None) -> Plan:
    """Plan a GGUF file; where its directory's manifest records it, use that probe and any GPU smoke of it."""
    path = Path(path)
    manifest = mf.load_or_none(path.parent) if path.is_file() else None
    artifact = manifest.artifact_at(path.name) if manifest else None
    report = artifact.probe if artifact and artifact.probe and _unchanged(path, artifact) else probe(path)
    smoke = manifest.smoke_result(artifact) if artifact else None
    return predict(report, ctx, vram, smoke)


def _unchanged(path: Path, artifact: mf.Artifact) -> bool:
    # Size, not sha256: hashing an 80 GB file to plan it would take a minute; a file rewritten since it was
    # recorded almost always changes size, and is then probed afresh.
    return path.stat().st_size == artifact.size
