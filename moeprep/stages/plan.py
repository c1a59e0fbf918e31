"""The plan stage: each file's KV cache and compute buffer sized by llama.cpp where the GGUF is, at the contexts
the card and the tier table show, and recorded in the manifest (`Artifact.plans`); and `plan_file`, the plan of one
GGUF now, for `moeprep plan`. The predictions themselves are computed from those records (predict/plan.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from moeprep.errors import MoeprepError
from moeprep.ggufio.probe import probe
from moeprep.llama.build import devices, versions
from moeprep.llama.context import DEFAULT_BATCH, DEFAULT_FLASH_ATTN, DEFAULT_UBATCH
from moeprep.llama.sizing import simulate
from moeprep.predict.plan import COMPUTE_NOT_INCLUDED, Plan, contexts_for, from_record, predict
from moeprep.predict.tiers import TierTable, build, headroom
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact
from moeprep.records.probe import ProbeReport
from moeprep.records.results import FlashAttn, PlanRecord

RECORDED_CACHE_TYPES = ("f16", "q8_0")  # what prepare sizes for the card: llama-server's default, and the usual saving


def plan_file(path: Path, ctx: int = 4096, vram: int | None = None, *, ubatch: int = DEFAULT_UBATCH,
              batch: int = DEFAULT_BATCH, flash_attn: FlashAttn | str = DEFAULT_FLASH_ATTN,
              simulate_compute: bool = True, cache_type: str = "f16") -> Plan:
    """Plan a GGUF file; where its directory's manifest records it, use that probe and any GPU smoke of it.

    The KV cache and compute buffer are sized by llama.cpp itself (`simulate`) unless `simulate_compute` is off.
    """
    path = Path(path)
    manifest = mf.load_or_none(path.parent) if path.is_file() else None
    artifact = manifest.artifact_at(path.name) if manifest else None
    known = artifact is not None and _unchanged(path, artifact)
    # a format 1 manifest's probe lacks the attention shape the KV cache follows from: read the header again
    recorded = artifact.probe if artifact and known and artifact.probe and artifact.probe.attention.head_count else None
    report = recorded or probe(path)
    smoke = manifest.smoke_result(artifact) if manifest and artifact and known else None  # other bytes: nothing
    smoke_ctx = manifest.smoke.settings.ctx if smoke and manifest and manifest.smoke else None
    sims, why = [], COMPUTE_NOT_INCLUDED
    if not simulate_compute:
        why = "not included (not simulated)"
    elif not report.loadable:
        why = "not included: current llama.cpp cannot load this layout, so it cannot size the compute buffer"
    else:
        try:
            sims = simulate(path, report, ctx=ctx, ubatch=ubatch, batch=batch, flash_attn=flash_attn,
                            cache_type=cache_type)
        except MoeprepError as e:
            why = f"not included: {e.message}"
    return predict(report, ctx, vram, smoke if cache_type == "f16" else None, simulations=sims, batch=batch,
                   ubatch=ubatch, flash_attn=flash_attn, smoke_ctx=smoke_ctx, compute_not_included=why,
                   cache_type=cache_type)


def record(path: Path, report: ProbeReport, contexts: list[int], *, ubatch: int = DEFAULT_UBATCH,
           batch: int = DEFAULT_BATCH, cache_types: tuple[str, ...] = RECORDED_CACHE_TYPES) -> list[PlanRecord]:
    """llama.cpp's sizings of `path` at each context and cache type, as the manifest keeps them (no timings: a
    record of the same file on the same build is the same record)."""
    backend = next((d["name"] for d in devices() if d["type"] in ("GPU", "IGPU")), "CPU")
    out = []
    for cache_type in cache_types:
        for ctx in contexts:
            rec = PlanRecord(ctx, batch, ubatch, cache_type, versions()["llama_cpp_commit"], backend)
            if not report.loadable:
                rec.why_not = "current llama.cpp cannot load this layout, so it cannot size the compute buffer"
            else:
                try:
                    rec.simulations = [replace(s, seconds=0.0) for s in simulate(
                        path, report, ctx=ctx, ubatch=ubatch, batch=batch, cache_type=cache_type)]
                except MoeprepError as e:
                    rec.why_not = e.message
            out.append(rec)
    return out


def current(records: list[PlanRecord], contexts: list[int]) -> bool:
    """Records made by this llama.cpp build, for every context and cache type the card shows."""
    backend = next((d["name"] for d in devices() if d["type"] in ("GPU", "IGPU")), "CPU")
    commit = versions()["llama_cpp_commit"]
    have = {(r.ctx, r.cache_type) for r in records if (r.llama_cpp, r.backend) == (commit, backend)}
    return {(c, t) for c in contexts for t in RECORDED_CACHE_TYPES} <= have


def stage(out: Path, manifest: mf.Manifest, *, save: bool = True, status=lambda line: None) -> list[str]:
    """Record each artifact's plans where the GGUF is, unless this build's are recorded (and its header again where
    the probe predates the chat format), and (with `save`) save the manifest. Returns the files planned now."""
    made = []
    for a in manifest.artifacts:
        if a.probe is None:
            continue
        path = Path(out) / a.path
        if a.probe.chat is None and path.is_file() and path.stat().st_size == a.size:
            a.probe = probe(path)  # probed by a moeprep that did not record the chat format: the header again
            made.append(a.path)
        contexts = contexts_for(a.probe.context_length)
        if current(a.plans, contexts) or not (path.is_file() and path.stat().st_size == a.size):
            continue  # up to date, or nothing here to size (a manifest pulled without its files keeps its records)
        status(f"plan {a.path}: sizing the KV cache and compute buffer at {', '.join(map(str, contexts))} tokens")
        a.plans = record(path, a.probe, contexts)
        if a.path not in made:
            made.append(a.path)
    if made and save:
        mf.save(out, manifest)
    return made


def _unchanged(path: Path, artifact: mf.Artifact) -> bool:
    # Size, not sha256: hashing an 80 GB file to plan it would take a minute; a file rewritten since it was
    # recorded almost always changes size, and is then probed afresh.
    return path.stat().st_size == artifact.size


def tiers(folder_or_file: Path, *, tiers_gib: list[float] | None = None, contexts: list[int] | None = None,
          flash_attn: FlashAttn | str = FlashAttn.AUTO, headroom_mib: float | None = None,
          cache_type: str = "f16") -> TierTable:
    """The tier table for every artifact of an output directory, or for one GGUF file, sized now."""
    target = Path(folder_or_file)
    folder = target if target.is_dir() else target.parent
    manifest = mf.load_or_none(folder)
    if target.is_dir():
        if manifest is None or not manifest.artifacts:
            raise MoeprepError(f"no artifacts recorded in {target}", "give a GGUF file, or run `moeprep convert` first")
        files: list[tuple[Path, Artifact | None]] = [(folder / a.path, a) for a in manifest.artifacts]
    else:
        files = [(target, manifest.artifact_at(target.name) if manifest else None)]
    entries = []
    for path, artifact in files:
        report = artifact.probe if artifact and artifact.probe and path.stat().st_size == artifact.size else probe(path)
        ctxs = contexts_for(report.context_length, contexts)
        plans = {r.ctx: from_record(report, r, flash_attn=flash_attn)
                 for r in record(path, report, ctxs, cache_types=(cache_type,))}
        smoke = manifest.smoke_result(artifact) if manifest and artifact else None
        entries.append((path.name, artifact.quant if artifact else path.stem, plans, smoke))
    room = headroom(manifest) if headroom_mib is None else (headroom_mib, "as given")
    return build(entries, tiers_gib, room, FlashAttn(flash_attn), cache_type)
