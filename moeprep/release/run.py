"""Release: run a recipe's stages in order, each skipping what is already up to date.

Up to date means: the same sha256, made from the same inputs with the same settings. Every stage
returns an Outcome; whether the release did work is read from them, never from their wording. The
output directory is locked for the whole run.

The stages meet through the target repo's staging branch (staging.py), so the three groups can run as
separate CI jobs on runners that share nothing: `prepare` makes the files, measures their quality and
stages them; `smoke` (one job per quant) smokes what is staged; `publish` merges, renders the card and
promotes staging to main in one commit. Run all at once, on one machine, it is the same path.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from moeprep.errors import MoeprepError
from moeprep.files import human_bytes
from moeprep.hub.snapshot import resolve
from moeprep.inputs import short
from moeprep.lock import locked
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.release import pipeline, staging
from moeprep.release.capacity import jobs
from moeprep.release.pipeline import Job, StagingStore, check_expectations
from moeprep.release.recipe import Recipe, discover
from moeprep.release.recipe import load as load_recipe

GROUPS: dict[str, list[Stage]] = {  # how scheduled CI splits a release into jobs
    "prepare": [Stage.DOWNLOAD, Stage.CONVERT, Stage.PROBE, Stage.QUANTIZE, Stage.PLAN, Stage.QUALITY, Stage.SPLIT,
                Stage.STAGE],
    "smoke": [Stage.SMOKE],
    "publish": [Stage.CARD, Stage.PROMOTE],
}
STAGES = [s for group in GROUPS.values() for s in group]  # a release's stages, in pipeline order
PREPARE = GROUPS["prepare"]
REVALIDATE = "revalidate"  # not a release's group: the monthly job that smokes what is published


def parse_stages(text: str | None) -> list[Stage]:
    if not text:
        return list(STAGES)
    chosen: list[Stage] = []
    for part in text.split(","):
        part = part.strip()
        for name in GROUPS.get(part, [part]):
            if name not in STAGES:
                raise MoeprepError(f"unknown stage {short(part)}", f"stages: {', '.join(STAGES)}; groups: {', '.join(GROUPS)}")
            if Stage(name) not in chosen:
                chosen.append(Stage(name))
    return [s for s in STAGES if s in chosen]


def job(r: Recipe, out: Path, quants: list[str] | None = None, status: Status = quiet) -> Job:
    """The recipe as the pipeline runs it: its plan, its smoke settings, its Hub repo as the store."""
    return Job(r.source.repo, out, r.quant_plan, StagingStore(r), revision=r.source.revision,
               smoke=staging.smoke_settings(r), card=r.card_options(), max_shard=r.hub.max_shard_bytes,
               expect=r.expect, source_size=r.source.size_bytes, quants=quants, status=status)


def default_out(recipe: Recipe) -> Path:
    return Path("releases") / recipe.name


@dataclass
class ReleaseReport:
    recipe: str
    out: str
    stages: dict[Stage, Outcome] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return any(o.did_work for o in self.stages.values())

    def to_dict(self) -> dict:
        """The report as `--json` prints it: per stage what was made and kept, not the stages' whole records."""
        return {"recipe": self.recipe, "out": self.out, "did_work": self.did_work,
                "stages": {name: {"made": o.made, "kept": o.kept, "notes": o.notes, "summary": o.summary()}
                           for name, o in self.stages.items()}}


def run(path: Path, *, stages: list[Stage] | None = None, out: Path | None = None, quants: list[str] | None = None,
        status: Status = quiet) -> ReleaseReport:
    r = load_recipe(path)
    stages = stages or list(STAGES)
    if quants and Stage.SMOKE not in stages:
        raise MoeprepError("--quant chooses what the smoke stage measures, and no smoke stage was chosen",
                           "add --stages smoke")
    out = Path(out) if out else default_out(r)
    report = ReleaseReport(str(r.path), str(out))
    with locked(out, f"release {r.path}"):
        skip = _prepared_on_staging(r, out, status) if Stage.STAGE in stages else None  # prepare as a CI job

        def skipped(stage: Stage) -> str | None:
            if skip and stage in PREPARE:
                return skip if stage == Stage.STAGE else ""
            return None

        report.stages = pipeline.run(job(r, out, quants, status), stages, skipped)
    return report


def _prepared_on_staging(r: Recipe, out: Path, status: Status) -> str | None:
    """On a runner that holds nothing yet, a staging branch that already holds this source commit's files
    made with the recipe's settings means prepare has nothing to do: it downloads nothing to find that out."""
    if mf.load_or_none(out) is not None:
        return None  # local work exists: the stages themselves decide what is up to date
    snap = resolve(r.source.repo, r.source.revision)
    current, why = staging.prepared(r, snap.commit)
    if current is not None:  # the staged probe is what the probe stage would check: another model stops here too
        check_expectations(r.expect, current, r.path)
    status(("prepare: nothing to do: " if current is not None else "prepare: ") + why)
    return f"nothing to do: {why}" if current is not None else None


@dataclass
class SourceInfo:
    repo: str
    revision: str
    commit: str | None = None
    files: int | None = None
    bytes: int | None = None
    why: str | None = None  # why the Hub did not answer


@dataclass
class PlannedFile:
    file: str
    estimated_bytes: int | None
    shards: int | None
    imatrix: bool


@dataclass
class Preflight:
    disk_free: int
    disk_needed: int | None
    disk_ok: bool | None
    ram: int
    largest_file: int | None
    ram_ok_for_cpu_smoke: bool | None


@dataclass
class DryRun:
    """What a release would do, as `moeprep release --dry-run` shows it."""

    recipe: str
    out: str
    stages: list[Stage]
    source: SourceInfo
    files: list[PlannedFile]
    already_made: list[str]
    preflight: Preflight
    hub: dict[str, str]
    unknown: list[str]
    estimates: str = "sizes of files not yet made are estimates from the parameter count (bits per weight per type)"

    def lines(self) -> list[str]:
        def size(n: int | None) -> str:
            return human_bytes(n) if n is not None else "unknown"

        src, pf = self.source, self.preflight
        lines = [f"release {self.recipe} into {self.out}: stages {', '.join(self.stages)}",
                 f"source {src.repo}@{src.revision}: commit {src.commit or 'unknown'}, "
                 f"{src.files if src.files is not None else 'unknown'} files, {size(src.bytes)}"]
        for f in self.files:
            state = "made" if f.file in self.already_made else "to make"
            shards = f", {f.shards} shards" if f.shards and f.shards > 1 else ""
            lines.append(f"  {f.file}: {state}, about {size(f.estimated_bytes)}{shards}" + (" (imatrix)" if f.imatrix else ""))
        ok = {True: "enough", False: "NOT enough", None: "unknown"}
        lines.append(f"disk: {size(pf.disk_needed)} needed, {size(pf.disk_free)} free: {ok[pf.disk_ok]}")
        lines.append(f"RAM: {size(pf.ram)}; largest file {size(pf.largest_file)} (a CPU smoke loads it): "
                     f"{ok[pf.ram_ok_for_cpu_smoke]}")
        lines.append(f"push to {self.hub['repo_id']} ({self.hub['layout']}, shards over {self.hub['max_shard']})")
        lines += [f"unknown: {u}" for u in self.unknown]
        return lines


def dry_run(path: Path, *, stages: list[Stage] | None = None, out: Path | None = None) -> DryRun:
    """What a release would do, with sizes where the Hub answers and 'unknown' where it does not."""
    r = load_recipe(path)
    out = Path(out) if out else default_out(r)
    unknown: list[str] = []
    source = SourceInfo(r.source.repo, r.source.revision)
    n_params = None
    try:
        snap = resolve(r.source.repo, r.source.revision)
        source.commit, source.files, source.bytes = snap.commit, len(snap.files), snap.size
        n_params = sum(f.size for f in snap.files if f.path.endswith(".safetensors")) // 2
    except MoeprepError as e:
        source.why = e.message
        unknown.append(f"source size and commit: {e.message}")
    plan = r.quant_plan
    sizes = plan.sizes(n_params, margin=1.0) if n_params else {}
    files = [PlannedFile(name, sizes.get(name), sizes[name] // r.hub.max_shard_bytes + 1 if name in sizes else None,
                         imatrix) for name, imatrix in [(plan.base, False)] + [(plan.path(t), plan.uses_imatrix(t))
                                                                                 for t in plan.targets]]
    if not n_params:
        unknown.append("output sizes (they follow from the source size)")
    existing = mf.load_or_none(out) if out.is_dir() else None
    free = shutil.disk_usage(out if out.exists() else Path(".")).free
    needed = (source.bytes or 0) + sum(sizes.values()) if n_params else None
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    largest = max(sizes.values(), default=0) or None
    return DryRun(str(r.path), str(out), stages or list(STAGES), source, files,
                  [a.path for a in existing.artifacts] if existing else [],
                  Preflight(free, needed, (free >= needed) if needed is not None else None, ram, largest,
                            (ram >= largest) if largest else None),
                  {"repo_id": r.hub.repo_id, "layout": r.hub.layout, "max_shard": r.hub.max_shard}, unknown)


def matrix(folder: Path, group: str | None = None) -> dict:
    """The GitHub Actions matrix for scheduled releases: one prepare and one publish job per recipe, one smoke
    job per recipe x quant, each with its runner and its estimated bytes, disk and minutes (capacity.py); and for
    the monthly re-validation (group `revalidate`), one GPU job per recipe's published repo."""
    groups = [group] if group else list(GROUPS)
    for g in groups:
        if g not in GROUPS and g != REVALIDATE:
            raise MoeprepError(f"unknown stage group {short(g)}", f"groups: {', '.join([*GROUPS, REVALIDATE])}")
    include: list[dict[str, object]] = []
    for path in discover(folder):
        r = load_recipe(path)
        if REVALIDATE in groups:
            include.append({"recipe": str(path), "name": r.name, "group": REVALIDATE, "repo_id": r.hub.repo_id,
                            "runner": "gpu", "runs_on": ["self-hosted", "gpu"]})
        for job in jobs(r):
            if job.group not in groups:
                continue
            entry: dict[str, object] = {"recipe": str(path), "name": r.name, "group": job.group, "stages": job.group,
                     "runner": "gpu" if job.group == "smoke" else "cpu", "runs_on": job.runs_on}
            if job.quant:
                entry["quant"] = job.quant
            entry["estimate"] = {k: v for k, v in job.to_dict().items() if k not in ("group", "quant", "runs_on")}
            include.append(entry)
    return {"include": include}
