"""Release: run a recipe's stages in order, each skipping what is already up to date.

Up to date means: the same sha256, made from the same inputs with the same settings. Every stage
returns an Outcome; whether the release did work is read from them, never from their wording. The
output directory is locked for the whole run.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import card as card_stage
from . import download as download_stage
from . import manifest as mf
from . import push as push_stage
from . import smoke as smoke_stage
from .errors import MoeprepError
from .files import human_bytes
from .lock import locked
from .outcome import Outcome, Status, quiet
from .pipeline import ImatrixSpec, artifact_name, convert_model, quantize_model
from .quantize import planned_size
from .recipe import Recipe, discover
from .recipe import load as load_recipe
from .results import SmokeSettings

GROUPS = {  # how scheduled CI splits a release into jobs
    "prepare": ["download", "convert", "quantize", "probe"],
    "smoke": ["smoke"],
    "publish": ["card", "push"],
}


@dataclass
class Run:
    """What every stage of one release shares."""

    recipe: Recipe
    out: Path
    status: Status = quiet
    fetched: tuple | None = None  # the download stage's verified (folder, Source), for convert


def _download(run: Run) -> Outcome:
    r = run.recipe
    snap = download_stage.resolve(r.source.repo, r.source.revision)
    download_stage.check_cache_space(snap)
    fetch = {f.path for f in download_stage.missing(snap)}
    run.fetched = download_stage.download(snap)
    return Outcome("download", made=sorted(fetch), kept=sorted(f.path for f in snap.files if f.path not in fetch),
                   notes=[f"{r.source.repo}@{r.source.revision} is commit {snap.commit}; every file verified"])


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


def _smoke(run: Run) -> Outcome:
    s = run.recipe.smoke
    settings = SmokeSettings(runs=s.runs, ctx=s.ctx, new_tokens=s.tokens, placements=list(s.placements))
    outcome = smoke_stage.run(run.out, settings, only_stale=True, status=run.status)
    if outcome.result and (failed := outcome.result.failed()):
        name, reasons = next(iter(failed.items()))
        raise MoeprepError(f"smoke failed for {', '.join(failed)}: {reasons[0]}", f"see {run.out / 'manifest.json'}")
    return outcome


def _card(run: Run) -> Outcome:
    r = run.recipe
    return card_stage.write(run.out, card_options(r), status=run.status)


def _push(run: Run) -> Outcome:
    r = run.recipe
    return push_stage.push(run.out, r.hub.repo_id, layout=r.hub.layout, private=r.hub.private, status=run.status)


def card_options(r: Recipe) -> card_stage.CardOptions:
    return card_stage.CardOptions(repo_id=r.hub.repo_id, layout=r.hub.layout, quantized_by=r.card.quantized_by,
                                  base_model=r.card.base_model,
                                  template=r.relative(r.card.template) if r.card.template else None,
                                  max_shard=r.hub.max_shard_bytes)


STAGES: dict[str, Callable[[Run], Outcome]] = {
    "download": _download, "convert": _convert, "quantize": _quantize, "probe": _probe,
    "smoke": _smoke, "card": _card, "push": _push,
}


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


def run(path: Path, *, stages: list[str] | None = None, out: Path | None = None, status: Status = quiet) -> ReleaseReport:
    r = load_recipe(path)
    out = Path(out) if out else default_out(r)
    report = ReleaseReport(str(r.path), str(out))
    context = Run(r, out, status)
    with locked(out, f"release {r.path}"):
        for name in stages or list(STAGES):
            report.stages[name] = STAGES[name](context)
    return report


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
    """The GitHub Actions matrix for scheduled releases: recipe x stage group."""
    groups = [group] if group else list(GROUPS)
    for g in groups:
        if g not in GROUPS:
            raise MoeprepError(f"unknown stage group {g!r}", f"groups: {', '.join(GROUPS)}")
    include = []
    for path in discover(folder):
        r = load_recipe(path)
        for g in groups:
            include.append({"recipe": str(path), "name": r.name, "group": g, "stages": ",".join(GROUPS[g]),
                            "runner": "gpu" if g == "smoke" else "cpu"})
    return {"include": include}
