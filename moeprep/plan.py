"""Offload plan from the GGUF alone: predicted GPU memory per placement, labelled as a prediction.

Weights: the bytes of every tensor the override leaves on the GPU, token_embd excepted (llama.cpp
always keeps the input layer in host memory; see probe). KV cache: n_ctx x layers x KV heads x (K + V head
size) x 2 bytes (f16 cache), or the compressed latent for MLA models. The compute buffer depends
on the backend and n_ubatch and is not predicted: it is stated as not included, and shown as
measured where a GPU smoke recorded it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MoeprepError
from .probe import _field, _read, probe

_SIZE = re.compile(r"^\s*([\d.]+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise MoeprepError(f"cannot read {text!r} as a size", "write it like 24GiB, 16GB or 8000MiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def kv_cache_bytes(path: Path, ctx: int) -> tuple[int, str]:
    reader = _read(Path(path))
    arch = str(_field(reader, "general.architecture"))

    def key(name, default=None):
        value = _field(reader, f"{arch}.{name}", default)
        if isinstance(value, list):  # per-layer arrays: take the largest, an upper bound
            return max(value) if value else default
        return value

    layers = int(key("block_count", 0))
    lora = key("attention.kv_lora_rank")
    if lora:
        rope = int(key("rope.dimension_count", 0))
        per_token = layers * (int(lora) + rope) * 2
        return ctx * per_token, f"MLA latent cache: ctx {ctx} x {layers} layers x (kv_lora_rank {lora} + rope {rope}) x 2 bytes"
    heads = int(key("attention.head_count", 1))
    kv_heads = int(key("attention.head_count_kv", heads))
    embd = int(key("embedding_length", 0))
    k_len = int(key("attention.key_length", embd // heads if heads else 0))
    v_len = int(key("attention.value_length", k_len))
    method = f"f16 cache: ctx {ctx} x {layers} layers x {kv_heads} KV heads x (K {k_len} + V {v_len}) x 2 bytes"
    window = key("attention.sliding_window")
    if window and int(window) < ctx:
        method += f"; sliding-window layers (window {window}) counted at full context, an upper bound"
    return ctx * layers * kv_heads * (k_len + v_len) * 2, method


def measured_gpu(smoke: dict | None, file: str, sha256: str | None) -> dict:
    """GPU buffer totals from a recorded smoke of this exact file, per placement (CUDA0 etc., not CUDA_Host)."""
    entry = (smoke or {}).get("artifacts", {}).get(file)
    if not entry or (sha256 and entry.get("sha256") and entry["sha256"] != sha256):
        return {}
    out = {}
    for name, placement in entry.get("placements", {}).items():
        gpu_buffers = [b for b in placement.get("buffers", [])
                       if not b["device"].startswith("CPU") and not b["device"].endswith("_Host")]
        if gpu_buffers:
            out[name] = {kind: sum(b["mib"] for b in gpu_buffers if b["kind"] == kind) * 2**20
                         for kind in ("model", "KV", "compute")}
    return out


def plan(path: Path, ctx: int = 4096, vram: int | None = None, smoke: dict | None = None,
         sha256: str | None = None) -> dict:
    path = Path(path)
    report = probe(path)
    kv, kv_method = kv_cache_bytes(path, ctx)
    measured = measured_gpu(smoke, path.name, sha256)
    rows = []
    for p in report.placements:
        weights = p.bytes_on_gpu
        row = {"placement": p.name, "weights_on_gpu": weights, "kv_cache": kv, "predicted_total": weights + kv,
               "fits": (weights + kv <= vram) if vram else None}
        if p.name in measured:
            m = measured[p.name]
            row["measured"] = m
            row["weights_error_pct"] = 100 * (weights - m["model"]) / m["model"] if m["model"] else None
        rows.append(row)
    choice = None
    if vram:
        fitting = [r for r in rows if r["fits"]]
        # Prefer everything on the GPU, then the fewest blocks' experts on the CPU, then all experts.
        order = {"gpu": -1, "cpu-moe": 10**9}
        fitting.sort(key=lambda r: order.get(r["placement"], int(r["placement"].split("=")[-1]) if "=" in r["placement"] else 0))
        choice = fitting[0]["placement"] if fitting else None
    return {
        "file": path.name,
        "kind": "prediction",
        "ctx": ctx,
        "vram": vram,
        "weights_total": report.bytes["total"],
        "token_embd_on_cpu": report.bytes["input_layer"],
        "kv_cache_method": kv_method,
        "compute_buffer": "not included (depends on backend and n_ubatch; see measured values where a GPU smoke exists)",
        "placements": rows,
        "recommended": choice,
        "is_moe": report.is_moe,
    }

