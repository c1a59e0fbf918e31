"""llama.cpp's own sizing of a context, with nothing allocated: the KV caches and compute buffers it would make.

The model is loaded with `no_alloc` (load mode none: mmap trips an assert there), and a context is created as
llama-server would create it: llama.cpp reserves its worst-case graphs and logs every buffer it would allocate,
in milliseconds, as llama-fit-params does. What it logged becomes a Simulation record.
"""

from __future__ import annotations

import time
from pathlib import Path

from moeprep.errors import MoeprepError
from moeprep.hardware import physical_cores
from moeprep.llama.build import devices
from moeprep.llama.context import (
    DEFAULT_BATCH,
    DEFAULT_FLASH_ATTN,
    DEFAULT_UBATCH,
    ContextParams,
    loaded_model,
    new_context,
)
from moeprep.llama.log import parse_log
from moeprep.placement import GPU, Placement
from moeprep.records.probe import ProbeReport
from moeprep.records.results import FlashAttn, Simulation


def simulate_context(path, *, patterns: list[str], params: ContextParams) -> str:
    """llama.cpp's own sizing of every buffer for `path`, with nothing allocated and no weight read.

    The model is loaded with `no_alloc`, every layer offloaded and the placement's overrides applied, then a
    context is created: llama.cpp reserves its worst-case graphs and logs each buffer's size, as
    llama-fit-params does. Returns the captured log.
    """
    lines: list[str] = []
    with loaded_model(path, patterns, no_alloc=True, log=lines, what="load to size the buffers of") as model:
        with new_context(model, params, log=lines, what="size", threadpool=False):
            pass
    return "".join(lines)


def read_simulation(text: str, placement: Placement | None, seconds: float = 0.0) -> Simulation:
    """The applied context settings, the memory and the compute buffers in a llama.cpp context-creation log."""
    log = parse_log(text)
    compute = [b for b in log.buffers if b.kind == "compute"]
    if not compute or not {"n_ctx", "n_batch", "n_ubatch"} <= log.context.keys():
        raise ValueError("no context was created: the log has no compute buffer or context settings")
    on_gpu = [b for b in compute if b.on_gpu]
    counted = on_gpu or [b for b in compute if b.device == "CPU"]
    asked = log.flash_attn
    ran = {True: FlashAttn.ON, False: FlashAttn.OFF}.get(log.flash_attn_used)  # type: ignore[arg-type]
    sizes = [line.split(": size =", 1)[1].strip() for line in text.splitlines() if ": size =" in line
             and line.strip().startswith(("llama_kv_cache", "llama_memory_recurrent"))]
    return Simulation(
        device="+".join(sorted({b.device for b in counted})),
        placement=placement,
        flash_attn=ran or asked or FlashAttn.OFF,
        n_ctx=int(log.context["n_ctx"]),
        n_batch=int(log.context["n_batch"]),
        n_ubatch=int(log.context["n_ubatch"]),
        compute=round(sum(b.mib for b in counted) * 2**20),
        buffers=compute,
        seconds=seconds,
        kv=round(log.memory_mib * 2**20),
        kv_method="; ".join(f"size = {s}" for s in sizes),
        asked=asked,
    )


def simulate(path: Path, report: ProbeReport, *, ctx: int, ubatch: int = DEFAULT_UBATCH, batch: int = DEFAULT_BATCH,
             flash_attn: FlashAttn | str = DEFAULT_FLASH_ATTN, cache_type: str = "f16") -> list[Simulation]:
    """Let llama.cpp size `path`'s KV cache and compute buffer for these settings, without allocating anything.

    Both flash attention states are simulated, so the plan can show both; with a GPU backend every placement is
    simulated on it with its overrides, and `auto` once more so that llama.cpp resolves it. On the CPU backend the
    overrides change nothing (every buffer is host memory), so one run per state serves every placement.
    `cache_type` is llama-server's -ctk/-ctv for both caches; a quantized V cache runs only with flash attention
    (llama.cpp refuses the context otherwise), so only that state is sized for one.
    """
    asked = FlashAttn(flash_attn)
    on_gpu = any(d["type"] in ("GPU", "IGPU") for d in devices())
    states = [FlashAttn.ON, FlashAttn.OFF] if cache_type in ("f16", "f32", "bf16") else [FlashAttn.ON]
    runs: list[tuple[Placement | None, list[str], FlashAttn]] = []
    if on_gpu:
        runs = [(p.name, p.patterns, fa) for p in report.placements for fa in states]
        if asked is FlashAttn.AUTO:
            runs.append((GPU, [], FlashAttn.AUTO))
    else:
        runs = [(None, [], fa) for fa in states]
    out = []
    for name, patterns, fa in runs:
        params = ContextParams(n_ctx=ctx, n_batch=batch, n_ubatch=ubatch, threads=physical_cores(), flash_attn=fa,
                               cache_type_k=cache_type, cache_type_v=cache_type)
        start = time.perf_counter()
        text = simulate_context(path, patterns=patterns, params=params)
        try:
            out.append(read_simulation(text, name, time.perf_counter() - start))
        except ValueError as e:
            raise MoeprepError(f"llama.cpp sized no context for {Path(path).name}: {e}",
                               "run with --debug and report it as a moeprep bug") from e
    return out
