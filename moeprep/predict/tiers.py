"""The tier table: for GPU memory tiers and contexts, which file, which offload, what RAM, what to type.

Every cell is a prediction from `plan` (weights + KV cache + compute buffer, the compute buffer sized by
llama.cpp's own allocator), fitted below the tier with a stated headroom for the CUDA context and
runtime, which llama.cpp's buffers do not include. Among a file's placements the one with the most on
the GPU that fits wins: `gpu`, then the smallest `--n-cpu-moe N`, then `--cpu-moe`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from moeprep.errors import MoeprepError
from moeprep.inputs import short
from moeprep.limits import MAX_TIERS
from moeprep.placement import Placement
from moeprep.predict import TIERS_GIB
from moeprep.predict.plan import Plan, from_record
from moeprep.records import manifest as mf
from moeprep.records.results import FileResult, FlashAttn

# The CUDA context and runtime beyond llama.cpp's buffers: 0.5-1.2 GB measured on an H200 (per-process NVML
# minus the buffers). A GPU smoke in the manifest replaces this with what it measured.
HEADROOM_MIB = 1024
GIB = 2**30


@dataclass
class Cell:
    file: str
    quant: str
    placement: Placement | None  # None: does not fit
    gpu_bytes: int | None  # predicted: weights + KV + compute
    ram_bytes: int | None  # weights left in system memory (experts moved, token_embd)
    command: str | None
    measured: bool = False  # a GPU smoke measured this file in this placement (at the smoke's context)
    speed: str | None = None  # the decode speed a smoke measured in this placement, with where: "41.2 tok/s on CUDA"


@dataclass
class Tier:
    gib: float
    ctx: int
    cells: list[Cell] = field(default_factory=list)


@dataclass
class TierTable:
    tiers: list[Tier]
    headroom_mib: float
    headroom_method: str
    contexts: list[int]
    flash_attn: FlashAttn  # as asked; each cell's plan resolved `auto` as the CUDA build does (plan.py)
    cache_type: str = "f16"  # the K and V cache type of the cells (llama-server's -ctk/-ctv)
    longest: list[Longest] = field(default_factory=list)
    kind: str = "prediction"
    method: str = ("weights the placement leaves on the GPU + KV cache + compute buffer (llama.cpp's allocator, "
                   "no_alloc), each below the tier minus the headroom; see `moeprep plan FILE --ctx N`")


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.05 * GIB else f"{n / 2**20:.0f} MiB"


def cell_text(cell: Cell) -> str:
    """A cell as the card and the CLI show it: the placement, and GPU and system memory in the units GPUs are sold in."""
    if cell.placement is None:
        return "does not fit"
    flags = " ".join(cell.placement.flags())
    shown = (f"`{flags}`" if flags else "all on GPU") + f": GPU {gib(cell.gpu_bytes or 0)}, RAM {gib(cell.ram_bytes or 0)}"
    return shown + (" †" if cell.measured else "") + f"; {cell.speed or 'speed not measured'}"


def command(file: str, placement: Placement, ctx: int, flash_attn: FlashAttn, cache_type: str = "f16") -> str:
    """The llama-server command for a cell, each argument shell-quoted. `--fit off`: llama-server's --fit is on by
    default at 0c1e570 and gives up, with a warning, once --n-gpu-layers or an expert override is set
    (common/fit.cpp); off, the command does exactly what its cell says. Threads are left to llama-server's default,
    one per physical core of the machine it runs on."""
    args = ["llama-server", "-m", file, "--n-gpu-layers", "999", *placement.flags(), "--ctx-size", str(ctx),
            "--flash-attn", str(flash_attn), "--fit", "off"]
    if cache_type != "f16":  # llama-server's default is f16
        args += ["--cache-type-k", cache_type, "--cache-type-v", cache_type]
    return shlex.join(args)


def parse_tiers(text: str) -> list[float]:
    """GPU sizes in GiB: "8,12,24"."""
    try:
        sizes = [float(part) for part in text[:1024].split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or len(text) > 1024 or any(not 0 < s <= 100_000 for s in sizes):
        raise MoeprepError(f"cannot read {short(text)} as GPU sizes", "give GiB, comma-separated: --tiers 8,12,24")
    if len(sizes) > MAX_TIERS:
        raise MoeprepError(f"{len(sizes)} GPU sizes is more than a table can show", f"give at most {MAX_TIERS}")
    return sizes


def headroom(manifest: mf.Manifest | None, default_mib: float = HEADROOM_MIB) -> tuple[float, str]:
    """The runtime overhead to keep free below each tier: measured where the manifest has a GPU smoke."""
    measured = [o for r in (manifest.smoke.artifacts.values() if manifest and manifest.smoke else [])
                for p in r.placements.values() if (o := p.overhead_mib()) is not None]
    if measured:
        return max(measured), f"the largest runtime overhead a GPU smoke of these files measured ({len(measured)} loads)"
    return default_mib, ("the CUDA context and runtime, not measured for these files: 0.5-1.2 GB measured on an H200, "
                         f"{default_mib:.0f} MiB kept")


def from_manifest(manifest: mf.Manifest, *, tiers_gib: list[float] | None = None) -> TierTable:
    """The tier table from the plans the manifest records (f16 caches, llama-server's default), with the longest
    context per tier for every recorded cache type: what the card shows, without any GGUF."""
    entries, longest = [], []
    for a in manifest.artifacts:
        by_type: dict[str, dict[int, Plan]] = {}
        for r in a.plans:
            if a.probe is not None:
                by_type.setdefault(r.cache_type, {})[r.ctx] = from_record(a.probe, r)
        entries.append((a.path, a.quant, by_type.get("f16", {}), manifest.smoke_result(a)))
        longest += [(a.path, a.quant, t, plans) for t, plans in sorted(by_type.items())]
    table = build(entries, tiers_gib, headroom(manifest), FlashAttn.AUTO,
                  backend=manifest.smoke.backend if manifest.smoke else None)
    table.longest = longest_contexts(longest, table)
    return table


@dataclass
class Longest:
    """The longest context a file runs at on a GPU of `gib` GiB, in the placement that fits it at the shortest."""

    gib: float
    file: str
    quant: str
    cache_type: str
    placement: Placement | None
    ctx: int | None  # None: nothing fits even at the shortest context recorded
    limit: bool  # the longest recorded context fits: the model's (or the record's) limit, not the GPU's


def longest_contexts(entries: list[tuple[str, str, str, dict[int, Plan]]], table: TierTable) -> list[Longest]:
    """For each tier, file and cache type: where the placement the tier chooses at the shortest recorded context
    stops fitting, interpolated linearly between the two of llama.cpp's sizings around the limit (the KV cache
    grows linearly with the context; the compute buffer nearly so), rounded down to llama.cpp's 256-cell pad."""
    out = []
    for file, quant, cache_type, plans in entries:
        ctxs = sorted(plans)
        for size in sorted({t.gib for t in table.tiers}):
            budget = size * GIB - table.headroom_mib * 2**20
            rows = _choices(plans[ctxs[0]]) if ctxs else []
            first = next((r for r in rows if r.compute is not None and r.predicted_total <= budget), None)
            if first is None:
                out.append(Longest(size, file, quant, cache_type, None, None, False))
                continue
            points = [(c, r.predicted_total) for c in ctxs for r in plans[c].rows
                      if r.placement == first.placement and r.compute is not None]
            below = [(c, t) for c, t in points if t <= budget]
            above = [(c, t) for c, t in points if t > budget]
            if not above:
                out.append(Longest(size, file, quant, cache_type, first.placement, max(c for c, _ in below), True))
                continue
            (c1, t1), (c2, t2) = max(below), min(above)
            ctx = c1 + (budget - t1) * (c2 - c1) / max(t2 - t1, 1)
            out.append(Longest(size, file, quant, cache_type, first.placement, int(ctx) // 256 * 256, False))
    return out


def build(entries: list[tuple[str, str, dict[int, Plan], FileResult | None]], tiers_gib: list[float] | None,
          room: tuple[float, str], flash_attn: FlashAttn, cache_type: str = "f16", backend: str | None = None) -> TierTable:
    """Fill the table: for each tier and context, each file's placement with the most on the GPU that fits, and the
    longest context each file reaches per tier with that cache type."""
    ctxs = sorted({ctx for _, _, plans, _ in entries for ctx in plans})
    result = TierTable([Tier(g, c) for c in ctxs for g in (tiers_gib or TIERS_GIB)], room[0], room[1], ctxs, flash_attn,
                       cache_type=cache_type)
    for name, quant, plans, smoke in entries:
        measured = {p for p, r in (smoke.placements.items() if smoke else []) if r.gpu_mib() is not None}
        speeds = {p: f"{r.decode_tps.mean:.1f} tok/s on {backend or 'the smoke machine'}"
                  for p, r in (smoke.placements.items() if smoke else []) if r.decode_tps.mean is not None}
        for ctx in ctxs:
            plan = plans.get(ctx)
            if plan is None:
                continue
            rows = _choices(plan)
            for tier in (t for t in result.tiers if t.ctx == ctx):
                budget = tier.gib * GIB - room[0] * 2**20
                best = next((r for r in rows if r.compute is not None and r.predicted_total <= budget), None)
                if best is None:
                    tier.cells.append(Cell(name, quant, None, None, None, None))
                    continue
                tier.cells.append(Cell(name, quant, best.placement, best.predicted_total,
                                       plan.weights_total - best.weights_on_gpu,
                                       command(name, best.placement, ctx, flash_attn, cache_type),
                                       best.placement in measured, speeds.get(best.placement)))
    result.longest = longest_contexts([(n, q, cache_type, plans) for n, q, plans, _ in entries], result)
    return result


def _choices(plan: Plan) -> list:
    """A plan's placements from the most on the GPU to the least; an N that moves every block's experts is left out
    for --cpu-moe, the simpler flag."""
    every = next((r.weights_on_gpu for r in plan.rows if r.placement == "cpu-moe"), None)
    return sorted((r for r in plan.rows if r.placement == "cpu-moe" or r.placement.n_cpu_moe is None
                   or r.weights_on_gpu != every), key=lambda r: r.placement.order)
