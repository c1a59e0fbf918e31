"""Staged releases: a branch of the target repo is the only store between a release's CI jobs.

- prepare ends with `stage`: the GGUFs (or their shards), `manifest.json` (with each file's plan, sized by
  llama.cpp where the file was made) and `quality.json` go to the recipe's staging branch (`hub.staging`,
  default `moeprep-staging`). Only files the branch lacks with the same sha256 are sent.
- smoke runs once per quant, on any runner: it reads the staging manifest, pulls just that quant's file
  (verified against the manifest), smokes it and commits `smoke/<quant>.json`. Jobs of different quants
  write different files, so parallel jobs never conflict; a result already staged for these bytes and
  settings is kept without downloading the GGUF.
- publish (promote.py) reads the staged manifest and results at one staging commit, merges the
  results into the manifest, renders the card and promotes staging to main in one commit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from moeprep.errors import MoeprepError
from moeprep.hub.repo import HubRepo, Want, plan_commit, token_check
from moeprep.placement import Placement
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import SmokeReport, SmokeSettings
from moeprep.release.recipe import Recipe
from moeprep.shell import hint
from moeprep.stages import measure
from moeprep.stages import quality as kld
from moeprep.stages import smoke as smoke_stage
from moeprep.stages.pull import pull

SMOKE_DIR = "smoke"


def smoke_path(label: str) -> str:
    return f"{SMOKE_DIR}/{label}.json"


def smoked_labels(r: Recipe) -> list[str]:
    """What the smoke matrix covers: the recipe's quants and mixes. The F16 is the quality reference; it is
    published but not smoked on a GPU (for an 80 GB model that would be one more 80 GB download per run)."""
    return list(dict.fromkeys([*r.quants, *r.mix]))


def smoke_settings(r: Recipe) -> SmokeSettings:
    s = r.smoke
    return SmokeSettings(runs=s.runs, ctx=s.ctx, new_tokens=s.tokens, placements=[Placement(p) for p in s.placements],
                         quality_chunks=s.quality_chunks, sweep=s.sweep)


@cache
def _report_adapter():
    return TypeAdapter(SmokeReport)


def check_layout(r: Recipe) -> None:
    if r.hub.layout != "single":
        raise MoeprepError(f"{r.path}: a staged release promotes one repo; layout {r.hub.layout} is not staged",
                           "use layout: single, or run `moeprep card DIR --layout per-quant --push` by hand")


# --- reading the staging branch ------------------------------------------------------------------------------

@dataclass
class Staged:
    """The staging branch at one commit: every later read and the promotion use that commit."""

    repo_id: str
    branch: str
    commit: str
    files: dict[str, str]  # path -> sha256 (LFS files) or git blob id (small files)
    manifest: mf.Manifest | None = None
    quality: kld.QualityRecord | None = None
    smoke: dict[str, SmokeReport] = field(default_factory=dict)  # label -> that job's report

    def holds(self, path: str, sha256: str) -> bool:
        return self.files.get(path) == sha256


def read(r: Recipe, *, results: bool = False) -> Staged | None:
    """The staging branch's head: its file list, manifest and quality record (and with `results`, every
    smoke result). None when the branch (or the repo) does not exist yet."""
    repo_id, branch = r.hub.repo_id, r.hub.staging
    commit = HubRepo(repo_id, branch).commit_sha()
    if commit is None:
        return None
    at = HubRepo(repo_id, commit)  # every read from the one commit, however the branch moves meanwhile
    staged = Staged(repo_id, branch, commit, at.files())
    where = f"{repo_id}@{branch}"
    if mf.FILENAME in staged.files:
        data = at.read_json(mf.FILENAME)
        try:
            staged.manifest = mf.Manifest.from_dict(data)
        except MoeprepError as e:
            raise MoeprepError(f"{where}: manifest.json: {e.message}", "run the release's prepare job again") from e
    if kld.FILENAME in staged.files:
        staged.quality = kld.parse(at.read_json(kld.FILENAME), f"{where}: {kld.FILENAME}")
    if results:
        for path in sorted(p for p in staged.files if p.startswith(SMOKE_DIR + "/") and p.endswith(".json")):
            staged.smoke[path[len(SMOKE_DIR) + 1:-5]] = _smoke_report(at, path, where)
    return staged


def _smoke_report(at: HubRepo, path: str, where: str) -> SmokeReport:
    try:
        return _report_adapter().validate_python(at.read_json(path))
    except ValidationError as e:
        raise MoeprepError(f"{where}: {path} is not a smoke report ({e.errors()[0]['msg']})",
                           "run that smoke job again") from e


def current_result(staged: Staged, label: str, settings: SmokeSettings) -> SmokeReport | None:
    """The staged smoke of exactly the staged bytes of `label`, with the settings asked for."""
    a = staged.manifest.artifact(label) if staged.manifest else None
    report = staged.smoke.get(label)
    if a is None or report is None or report.settings.request_key() != settings.request_key():
        return None
    entry = report.artifacts.get(a.path)
    return report if entry is not None and entry.sha256 == a.sha256 and entry.ok else None


# --- prepare: stage ------------------------------------------------------------------------------------------

def stage(out: Path, r: Recipe, *, status: Status = quiet) -> Outcome:
    """Push the prepared directory to the staging branch: GGUFs or shards, the manifest, the quality record."""
    check_layout(r)
    out = Path(out)
    m = mf.load(out)
    record = kld.load(out)
    if record is None:
        raise MoeprepError(f"no {kld.FILENAME} in {out}", "run the quality stage first (it is part of prepare)")
    if unsplit := [a.path for a in m.artifacts if a.size > r.hub.max_shard_bytes and not a.shards]:
        raise MoeprepError(f"{unsplit[0]} is larger than hub.max_shard ({r.hub.max_shard}) and not split",
                           f"run {hint('moeprep', 'release', r.path, '--stages', 'split,stage')}")
    token_check()
    staging = HubRepo(r.hub.repo_id, r.hub.staging)
    remote = staging.files()
    imatrix = m.imatrix_file()
    wanted = [Want(f.path, f.sha256, local=out / f.path)
              for f in [f for a in m.artifacts for f in a.upload_files()] + ([imatrix] if imatrix else [])]
    # The staged manifest is prepare's record: smoke results and the card's record reach the manifest only at
    # publish (on one machine the directory's manifest may hold them from an earlier publish), and a new timestamp
    # alone changes nothing.
    m.smoke = None
    m.card = None
    data = m.to_dict()
    staged = read(r) if mf.FILENAME in remote else None
    same = staged is not None and staged.manifest is not None and same_manifest(staged.manifest.to_dict(), data)
    if not same:
        data["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        wanted.append(Want(mf.FILENAME, local=(json.dumps(data, indent=2) + "\n").encode()))
    wanted.append(Want(kld.FILENAME, local=(out / kld.FILENAME).read_bytes()))
    todo, kept = plan_commit(wanted, remote)
    outcome: Outcome[None] = Outcome(Stage.STAGE, kept=kept + ([mf.FILENAME] if same else []))
    if todo:
        status(f"{r.hub.repo_id}@{r.hub.staging}: staging {len(todo)} files in one commit")
        staging.commit(todo, f"moeprep staging: {m.model} prepared from {m.source.id}@{m.source.commit}",
                       private=r.hub.private)
        outcome.made = [w.path_in_repo for w in todo]
    return outcome


def same_manifest(a: dict, b: dict) -> bool:
    return {**a, "updated": ""} == {**b, "updated": ""}


def prepared(r: Recipe, commit: str | None) -> tuple[mf.Manifest | None, str]:
    """Whether the staging branch already holds what prepare would make now from source commit `commit`:
    the same source commit, every file the recipe asks for made with its settings, each staged with its
    sha256, its plan and a current quality record. Reads only the branch's file list and small files.
    Returns the staged manifest where it does (None where not), and why."""
    if commit is None:
        return None, "the source commit is unknown"
    staged = read(r)
    if staged is None or staged.manifest is None:
        return None, f"{r.hub.repo_id}@{r.hub.staging} holds no manifest yet"
    m = staged.manifest
    if (m.source.id, m.source.commit) != (r.source.repo, commit):
        return None, f"staging was prepared from {m.source.id}@{m.source.commit}, the source is now at {commit}"
    base = m.base
    if base is None or base.quant != r.outtype.upper() or base.settings.outtype != r.outtype:
        return None, f"staging holds no {r.outtype.upper()} conversion"
    plan = r.quant_plan
    i = m.imatrix
    spec = plan.imatrix
    if spec is not None and spec.text is not None and (
            i is None or i.made_from != base.sha256
            or (i.text_sha256, i.ctx, i.chunks) != (hashlib.sha256(spec.text.read_bytes()).hexdigest(), spec.ctx,
                                                    spec.chunks)):
        return None, "the staged importance matrix was made from another text or with other settings"
    for t in plan.targets:
        a = m.artifact(t.label)
        if a is None or a.made_from != base.sha256 or a.settings != plan.settings(t, i.sha256 if i else None):
            return None, f"staging holds no current {t.label}"
    for a in m.artifacts:
        if a.size > r.hub.max_shard_bytes and not (a.shards and all(s.max_bytes == r.hub.max_shard_bytes for s in a.shards)):
            return None, f"{a.path} is not staged as shards of {r.hub.max_shard}"
        for f in a.upload_files():
            if not staged.holds(f.path, f.sha256):
                return None, f"staging lacks {f.path} with the sha256 the manifest lists"
        if a.probe is not None and not a.plans:
            return None, f"staging's manifest records no plan of {a.path}"
    if (imatrix := m.imatrix_file()) and not staged.holds(imatrix.path, imatrix.sha256):
        return None, f"staging lacks {imatrix.path} with the sha256 the manifest lists"
    q = staged.quality
    if (q is None or q.reference_sha256 != base.sha256 or q.settings.quality_key() != measure.resolved(smoke_settings(r))[0].quality_key()
            or any(q.current(a) is None for a in m.artifacts if a is not base)):
        return None, "staging holds no current quality record"
    return m, f"{r.hub.repo_id}@{r.hub.staging} (commit {staged.commit[:12]}) holds every file, made from " \
                 f"{m.source.id}@{commit[:12]} with the recipe's settings"


# --- smoke ---------------------------------------------------------------------------------------------------

def smoke(out: Path, r: Recipe, quants: list[str] | None = None, *, status: Status = quiet) -> Outcome:
    """Smoke each chosen quant from the staging branch and stage its result as smoke/<quant>.json.

    A quant whose staged result measured the staged bytes with the recipe's settings is kept, and its file
    is not downloaded. Each result is committed on its own, so parallel jobs of other quants never conflict.
    """
    check_layout(r)
    labels = smoked_labels(r)
    if quants:
        chosen = [_label(q, labels, r) for q in quants]
        labels = [q for q in labels if q in chosen]
    staged = read(r, results=True)
    if staged is None or staged.manifest is None:
        raise MoeprepError(f"{r.hub.repo_id}@{r.hub.staging} holds nothing to smoke",
                           f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} first")
    settings = smoke_settings(r)
    outcome: Outcome[None] = Outcome(Stage.SMOKE)
    for label in labels:
        a = staged.manifest.artifact(label)
        if a is None:
            raise MoeprepError(f"{r.hub.repo_id}@{r.hub.staging} has no {label}",
                               f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} again")
        if current_result(staged, label, settings) is not None:
            outcome.kept.append(smoke_path(label))
            continue
        if a.shards:
            raise MoeprepError(f"{a.path} is staged as {len(a.shards)} shards; smoking sharded files is not supported yet",
                               "raise hub.max_shard in the recipe above the file's size")
        token_check()  # before the GGUF moves: a job that cannot write its result should not measure
        pulled = pull(f"{r.hub.repo_id}@{staged.commit}", out, quants=[label], status=status)
        outcome.notes += [f"pulled {p} from {r.hub.repo_id}@{r.hub.staging} (sha256 verified)" for p in pulled.made]
        measured = smoke_stage.run(Path(out) / a.path, settings, quality=False, status=status)
        report = measured.result
        if report is None or a.path not in report.artifacts:
            raise MoeprepError(f"smoke measured nothing for {a.path}", "run with --debug and report a moeprep bug")
        report.artifacts = {a.path: report.artifacts[a.path]}
        if failed := report.failed():
            raise MoeprepError(f"smoke failed for {a.path}: {failed[a.path][0]}",
                               "nothing was staged for it; fix the cause and run this job again")
        data = (json.dumps(_report_adapter().dump_python(report, mode="json"), indent=2) + "\n").encode()
        status(f"{r.hub.repo_id}@{r.hub.staging}: adding {smoke_path(label)}")
        HubRepo(r.hub.repo_id, r.hub.staging).commit(
            [Want(smoke_path(label), local=data)],
            f"moeprep smoke: {a.path} on {report.hardware.cpu}" + "".join(f", {g.name}" for g in report.hardware.gpus))
        outcome.made.append(smoke_path(label))
    return outcome


def _label(q: str, labels: list[str], r: Recipe) -> str:
    found = next((x for x in labels if x.upper() == q.upper()), None)
    if found is None:
        raise MoeprepError(f"{r.path} does not smoke {q}", f"its quants and mixes: {', '.join(labels)}")
    return found
