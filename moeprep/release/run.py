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
from typing import Callable

from moeprep.errors import MoeprepError
from moeprep.files import human_bytes
from moeprep.lock import locked
from moeprep.predict import plan as plan_stage
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Status, quiet
from moeprep.release import promote, staging
from moeprep.release.recipe import Recipe, discover
from moeprep.release.recipe import load as load_recipe
from moeprep.stages import card as card_stage
from moeprep.stages import download as download_stage
from moeprep.stages import quality as kld
from moeprep.stages.pipeline import (
    ImatrixSpec,
    artifact_name,
    convert_model,
    quantize_model,
)
from moeprep.stages.quantize import planned_size

GROUPS = {  # how scheduled CI splits a release into jobs
    "prepare": ["download", "convert", "quantize", "probe", "plan", "quality", "stage"],
    "smoke": ["smoke"],
    "publish": ["card", "promote"],
}


@dataclass
class Run:
    """What every stage of one release shares."""

    recipe: Recipe
    out: Path
    status: Status = quiet
    quants: list[str] | None = None  # smoke only these quants (a matrix job's one)
    fetched: tuple | None = None  # the download stage's verified (folder, Source), for convert
    staged: staging.Staged | None = None  # the staging commit the card was rendered from, for promote


def _download(run: Run) -> Outcome:
    r = run.recipe
    snap = download_stage.resolve(r.source.repo, r.source.revision)
    download_stage.check_cache_space(snap)
    fetch = {f.path for f in download_stage.missing(snap)}
    run.fetched = download_stage.download(snap)
    notes = [f"{r.source.repo}@{r.source.revision} is commit {snap.commit}; every file verified"]
    if r.source.size_bytes and abs(snap.size - r.source.size_bytes) > 0.05 * r.source.size_bytes:
        notes.append(f"the source is {human_bytes(snap.size)}, the recipe says {r.source.size}: `moeprep matrix` "
                     "sizes the jobs from the recipe, so correct source.size")
    return Outcome("download", made=sorted(fetch), kept=sorted(f.path for f in snap.files if f.path not in fetch),
                   notes=notes)


def _convert(run: Run) -> Outcome:
    r = run.recipe
    return convert_model(r.source.repo, out=run.out, outtype=r.outtype, revision=r.source.revision,
                         quants=r.quants + r.mix, fetched=run.fetched, status=run.status)


def _quantize(run: Run) -> Outcome:
    r = run.recipe
    spec = None
    if r.imatrix:
        spec = ImatrixSpec(r.relative(r.imatrix.calibration), r.imatrix.quants, r.imatrix.ctx, r.imatrix.chunks)
    return quantize_model(run.out, quants=r.quants, mixes=r.mix, tensor_types=r.tensor_types, imatrix=spec,
                          status=run.status)


def _probe(run: Run) -> Outcome:
    manifest = mf.load(run.out)
    check_expectations(run.recipe, manifest)
    return Outcome("probe", kept=[manifest.base.path], notes=["the converted file matches the recipe's expect section"])


def _plan(run: Run) -> Outcome:
    """Each file's KV cache and compute buffer, sized by llama.cpp where the file is: the card shows them later,
    in a job that holds no GGUF."""
    manifest = mf.load(run.out)
    made = plan_stage.stage(run.out, manifest, status=run.status)
    return Outcome("plan", made=made, kept=[a.path for a in manifest.artifacts if a.path not in made])


def _quality(run: Run) -> Outcome:
    return kld.measure(run.out, staging.smoke_settings(run.recipe), status=run.status)


def _stage(run: Run) -> Outcome:
    return staging.stage(run.out, run.recipe, status=run.status)


def _smoke(run: Run) -> Outcome:
    return staging.smoke(run.out, run.recipe, run.quants, status=run.status)


def _card(run: Run) -> Outcome:
    outcome, run.staged = promote.publish_card(run.out, run.recipe, status=run.status)
    return outcome


def _promote(run: Run) -> Outcome:
    return promote.promote(run.out, run.recipe, run.staged, status=run.status)


def card_options(r: Recipe) -> card_stage.CardOptions:
    return card_stage.CardOptions(repo_id=r.hub.repo_id, layout=r.hub.layout, quantized_by=r.card.quantized_by,
                                  base_model=r.card.base_model,
                                  template=r.relative(r.card.template) if r.card.template else None,
                                  max_shard=r.hub.max_shard_bytes)


STAGES: dict[str, Callable[[Run], Outcome]] = {
    "download": _download, "convert": _convert, "quantize": _quantize, "probe": _probe, "plan": _plan, "quality": _quality,
    "stage": _stage, "smoke": _smoke, "card": _card, "promote": _promote,
}
PREPARE = GROUPS["prepare"]


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    chosen = []
    for part in text.split(","):
        part = part.strip()
        for name in GROUPS.get(part, [part]):
            if name not in STAGES:
                raise MoeprepError(f"unknown stage {part!r}", f"stages: {', '.join(STAGES)}; groups: {', '.join(GROUPS)}")
            if name not in chosen:
                chosen.append(name)
    return [s for s in STAGES if s in chosen]


def default_out(recipe: Recipe) -> Path:
    return Path("releases") / recipe.name


def check_expectations(recipe: Recipe, manifest: mf.Manifest) -> None:
    """The recipe's architecture facts against the converted file: a release of the wrong model stops here."""
    e, probe = recipe.expect, manifest.probe
    wrong = []
    if e.architecture and manifest.source.architecture != e.architecture:
        wrong.append(f"architecture {manifest.source.architecture} (expected {e.architecture})")
    for key in ("expert_count", "expert_used_count", "expert_shared_count", "block_count"):
        want = getattr(e, key)
        if want is not None and getattr(probe, key, None) != want:
            wrong.append(f"{key} {getattr(probe, key, None)} (expected {want})")
    if wrong:
        raise MoeprepError(f"{recipe.path}: the converted file does not match the recipe: {'; '.join(wrong)}",
                           "check the source revision, or correct the recipe's expect section")


@dataclass
class ReleaseReport:
    recipe: str
    out: str
    stages: dict[str, Outcome] = field(default_factory=dict)

    @property
    def did_work(self) -> bool:
        return any(o.did_work for o in self.stages.values())

    def to_dict(self) -> dict:
        """The report as `--json` prints it: per stage what was made and kept, not the stages' whole records."""
        return {"recipe": self.recipe, "out": self.out, "did_work": self.did_work,
                "stages": {name: {"made": o.made, "kept": o.kept, "notes": o.notes, "summary": o.summary()}
                           for name, o in self.stages.items()}}


def run(path: Path, *, stages: list[str] | None = None, out: Path | None = None, quants: list[str] | None = None,
        status: Status = quiet) -> ReleaseReport:
    r = load_recipe(path)
    stages = stages or list(STAGES)
    if quants and "smoke" not in stages:
        raise MoeprepError("--quant chooses what the smoke stage measures, and no smoke stage was chosen",
                           "add --stages smoke")
    out = Path(out) if out else default_out(r)
    report = ReleaseReport(str(r.path), str(out))
    context = Run(r, out, status, quants=quants)
    with locked(out, f"release {r.path}"):
        skip = _prepared_on_staging(context) if "stage" in stages else None  # prepare as a CI job
        for name in stages:
            if skip and name in PREPARE:
                report.stages[name] = Outcome(name, notes=[skip] if name == "stage" else [])
                continue
            report.stages[name] = STAGES[name](context)
    return report


def _prepared_on_staging(run: Run) -> str | None:
    """On a runner that holds nothing yet, a staging branch that already holds this source commit's files
    made with the recipe's settings means prepare has nothing to do: it downloads nothing to find that out."""
    if mf.load_or_none(run.out) is not None:
        return None  # local work exists: the stages themselves decide what is up to date
    r = run.recipe
    snap = download_stage.resolve(r.source.repo, r.source.revision)
    current, why = staging.prepared(r, snap.commit)
    if current is not None:  # the staged probe is what the probe stage would check: another model stops here too
        check_expectations(r, current)
    run.status(("prepare: nothing to do: " if current is not None else "prepare: ") + why)
    return f"nothing to do: {why}" if current is not None else None


def plan(path: Path, *, stages: list[str] | None = None, out: Path | None = None) -> dict:
    """What a release would do, with sizes where the Hub answers and 'unknown' where it does not."""
    r = load_recipe(path)
    stages = stages or list(STAGES)
    out = Path(out) if out else default_out(r)
    unknown: list[str] = []
    try:
        snap = download_stage.resolve(r.source.repo, r.source.revision)
        source = {"commit": snap.commit, "files": len(snap.files), "bytes": snap.size}
        n_params = sum(f.size for f in snap.files if f.path.endswith(".safetensors")) // 2
    except MoeprepError as e:
        source = {"commit": None, "files": None, "bytes": None, "why": e.message}
        unknown.append(f"source size and commit: {e.message}")
        n_params = None
    files = []
    for q in [r.outtype.upper(), *r.quants, *r.mix]:
        size = (n_params * 2 if q == r.outtype.upper() else planned_size(n_params, q) / 1.1) if n_params else None
        shards = int(size // r.hub.max_shard_bytes) + 1 if size else None
        files.append({"file": artifact_name(r.name, q), "estimated_bytes": int(size) if size else None,
                      "shards": shards, "imatrix": bool(r.imatrix and q in r.imatrix.quants)})
    if not n_params:
        unknown.append("output sizes (they follow from the source size)")
    existing = mf.load_or_none(out) if out.is_dir() else None
    free = shutil.disk_usage(out if out.exists() else Path(".")).free
    needed = (source["bytes"] or 0) + sum(f["estimated_bytes"] or 0 for f in files) if n_params else None
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    largest = max((f["estimated_bytes"] or 0 for f in files), default=0) or None
    return {
        "recipe": str(r.path), "out": str(out), "stages": stages,
        "source": {"repo": r.source.repo, "revision": r.source.revision, **source},
        "files": files,
        "already_made": [a.path for a in existing.artifacts] if existing else [],
        "preflight": {
            "disk_free": free,
            "disk_needed": needed,
            "disk_ok": (free >= needed) if needed is not None else None,
            "ram": ram,
            "largest_file": largest,
            "ram_ok_for_cpu_smoke": (ram >= largest) if largest else None,
        },
        "hub": {"repo_id": r.hub.repo_id, "layout": r.hub.layout, "max_shard": r.hub.max_shard},
        "unknown": unknown,
        "estimates": "sizes of files not yet made are estimates from the parameter count (bits per weight per type)",
    }


def describe(p: dict) -> list[str]:
    def size(n):
        return human_bytes(n) if n is not None else "unknown"

    lines = [f"release {p['recipe']} into {p['out']}: stages {', '.join(p['stages'])}",
             f"source {p['source']['repo']}@{p['source']['revision']}: commit {p['source']['commit'] or 'unknown'}, "
             f"{p['source']['files'] if p['source']['files'] is not None else 'unknown'} files, {size(p['source']['bytes'])}"]
    for f in p["files"]:
        state = "made" if f["file"] in p["already_made"] else "to make"
        shards = f", {f['shards']} shards" if f["shards"] and f["shards"] > 1 else ""
        lines.append(f"  {f['file']}: {state}, about {size(f['estimated_bytes'])}{shards}" + (" (imatrix)" if f["imatrix"] else ""))
    pf = p["preflight"]
    ok = {True: "enough", False: "NOT enough", None: "unknown"}
    lines.append(f"disk: {size(pf['disk_needed'])} needed, {size(pf['disk_free'])} free: {ok[pf['disk_ok']]}")
    lines.append(f"RAM: {size(pf['ram'])}; largest file {size(pf['largest_file'])} (a CPU smoke loads it): {ok[pf['ram_ok_for_cpu_smoke']]}")
    lines.append(f"push to {p['hub']['repo_id']} ({p['hub']['layout']}, shards over {p['hub']['max_shard']})")
    for u in p["unknown"]:
        lines.append(f"unknown: {u}")
    return lines


def matrix(folder: Path, group: str | None = None) -> dict:
    """The GitHub Actions matrix for scheduled releases: one prepare and one publish job per recipe, one smoke
    job per recipe x quant, each with its runner and its estimated bytes, disk and minutes (capacity.py)."""
    from moeprep.release.capacity import jobs

    groups = [group] if group else list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            raise MoeprepError(f"unknown stage group {g!r}", f"groups: {', '.join(GROUPS)}")
    include = []
    for path in discover(folder):
        r = load_recipe(path)
        for job in jobs(r):
            if job.group not in groups:
                continue
            entry = {"recipe": str(path), "name": r.name, "group": job.group, "stages": job.group,
                     "runner": "gpu" if job.group == "smoke" else "cpu", "runs_on": job.runs_on}
            if job.quant:
                entry["quant"] = job.quant
            entry["estimate"] = {k: v for k, v in job.to_dict().items() if k not in ("group", "quant", "runs_on")}
            include.append(entry)
    return {"include": include}
