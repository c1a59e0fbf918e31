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
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from moeprep.errors import MoeprepError
from moeprep.hub import errors as hub
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Status, quiet
from moeprep.records.results import SmokeReport, SmokeSettings
from moeprep.release.recipe import Recipe
from moeprep.shell import hint
from moeprep.stages import quality as kld

SMOKE_DIR = "smoke"


def smoke_path(label: str) -> str:
    return f"{SMOKE_DIR}/{label}.json"


def smoked_labels(r: Recipe) -> list[str]:
    """What the smoke matrix covers: the recipe's quants and mixes. The F16 is the quality reference; it is
    published but not smoked on a GPU (for an 80 GB model that would be one more 80 GB download per run)."""
    return list(dict.fromkeys([*r.quants, *r.mix]))


def smoke_settings(r: Recipe) -> SmokeSettings:
    s = r.smoke
    return SmokeSettings(runs=s.runs, ctx=s.ctx, new_tokens=s.tokens, placements=list(s.placements),
                         quality_chunks=s.quality_chunks)


def _same_request(a: SmokeSettings, b: SmokeSettings) -> bool:
    """A recorded smoke answers the recipe when it measured what the recipe asks (threads follow the runner)."""
    keys = ("runs", "ctx", "new_tokens", "placements", "flash_attn", "n_batch", "n_ubatch", "prompt", "warmup_runs")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@cache
def _report_adapter():
    from pydantic import TypeAdapter

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


def download(repo_id: str, path: str, revision: str) -> Path:
    from huggingface_hub import hf_hub_download

    from moeprep import progress

    if progress.is_disabled():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return Path(hf_hub_download(repo_id, path, revision=revision))
    except Exception as e:
        raise hub.error(e, repo_id, revision=revision) from e


def read_json(repo_id: str, path: str, revision: str) -> object:
    local = download(repo_id, path, revision)
    if local.stat().st_size > mf.MAX_BYTES:
        raise MoeprepError(f"{repo_id}@{revision}: {path} is larger than {mf.MAX_BYTES // 2**20} MiB, so moeprep did "
                           "not write it", "run the job that wrote it again")
    try:
        return json.loads(local.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeprepError(f"{repo_id}@{revision}: {path} is not JSON ({e})", "run the job that wrote it again") from e


def read(r: Recipe, *, results: bool = False) -> Staged | None:
    """The staging branch's head: its file list, manifest and quality record (and with `results`, every
    smoke result). None when the branch (or the repo) does not exist yet."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo_id, branch = r.hub.repo_id, r.hub.staging
    try:
        info = HfApi().repo_info(repo_id, revision=branch)
        tree = HfApi().list_repo_tree(repo_id, recursive=True, revision=info.sha)
        files = {f.path: (f.lfs.sha256 if f.lfs else f.blob_id) for f in tree if hasattr(f, "blob_id")}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except Exception as e:
        raise hub.error(e, repo_id, revision=branch) from e
    staged = Staged(repo_id, branch, info.sha, files)
    where = f"{repo_id}@{branch}"
    if mf.FILENAME in files:
        try:
            staged.manifest = mf.Manifest.from_dict(read_json(repo_id, mf.FILENAME, info.sha))
        except MoeprepError as e:
            raise MoeprepError(f"{where}: manifest.json: {e.message}", "run the release's prepare job again") from e
    if kld.FILENAME in files:
        staged.quality = kld.parse(read_json(repo_id, kld.FILENAME, info.sha), f"{where}: {kld.FILENAME}")
    if results:
        for path in sorted(p for p in files if p.startswith(SMOKE_DIR + "/") and p.endswith(".json")):
            staged.smoke[path[len(SMOKE_DIR) + 1:-5]] = _smoke_report(repo_id, path, info.sha, where)
    return staged


def _smoke_report(repo_id: str, path: str, revision: str, where: str) -> SmokeReport:
    from pydantic import ValidationError

    try:
        return _report_adapter().validate_python(read_json(repo_id, path, revision))
    except ValidationError as e:
        raise MoeprepError(f"{where}: {path} is not a smoke report ({e.errors()[0]['msg']})",
                           "run that smoke job again") from e


def current_result(staged: Staged, label: str, settings: SmokeSettings) -> SmokeReport | None:
    """The staged smoke of exactly the staged bytes of `label`, with the settings asked for."""
    a = staged.manifest.artifact(label) if staged.manifest else None
    report = staged.smoke.get(label)
    if a is None or report is None or not _same_request(report.settings, settings):
        return None
    entry = report.artifacts.get(a.path)
    return report if entry is not None and entry.sha256 == a.sha256 and entry.ok else None


# --- prepare: stage ------------------------------------------------------------------------------------------

def blob_ids(data: bytes) -> set[str]:
    """The ids the Hub may list a small file under: its git blob id, or its sha256 when it stored it in LFS."""
    return {hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), hashlib.sha256(data).hexdigest()}


def stage(out: Path, r: Recipe, *, status: Status = quiet) -> Outcome:
    """Push the prepared directory to the staging branch: GGUFs or shards, the manifest, the quality record."""
    from huggingface_hub import CommitOperationAdd

    from moeprep.stages.push import commit, remote_files, token_check
    from moeprep.stages.split import shard_artifacts

    check_layout(r)
    out = Path(out)
    m = mf.load(out)
    record = kld.load(out)
    if record is None:
        raise MoeprepError(f"no {kld.FILENAME} in {out}", "run the quality stage first (it is part of prepare)")
    token_check()
    outcome = Outcome("stage", notes=shard_artifacts(out, m, r.hub.max_shard_bytes, status=status))
    m = mf.load(out)  # splitting recorded shards
    remote = remote_files(r.hub.repo_id, r.hub.staging)
    ops, sizes = [], {}
    for a in m.artifacts:
        for path, size, sha, _ in a.upload_files():
            if remote.get(path) == sha:
                outcome.kept.append(path)
            else:
                ops.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(out / path)))
                sizes[path] = size
    # The staged manifest is prepare's record: smoke results reach the manifest only at publish (on one machine
    # the directory's manifest may hold them from an earlier publish), and a new timestamp alone changes nothing.
    m.smoke = None
    data = m.to_dict()
    staged = read(r) if mf.FILENAME in remote else None
    if staged is not None and staged.manifest is not None and same_manifest(staged.manifest.to_dict(), data):
        outcome.kept.append(mf.FILENAME)
    else:
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        ops.append(CommitOperationAdd(path_in_repo=mf.FILENAME,
                                      path_or_fileobj=(json.dumps(data, indent=2) + "\n").encode()))
    quality_data = (out / kld.FILENAME).read_bytes()
    if remote.get(kld.FILENAME) in blob_ids(quality_data):
        outcome.kept.append(kld.FILENAME)
    else:
        ops.append(CommitOperationAdd(path_in_repo=kld.FILENAME, path_or_fileobj=quality_data))
    if ops:
        status(f"{r.hub.repo_id}@{r.hub.staging}: staging {len(ops)} files in one commit")
        commit(r.hub.repo_id, ops, f"moeprep staging: {m.model} prepared from {m.source.id}@{m.source.commit}",
               revision=r.hub.staging, private=r.hub.private)
        outcome.made = [op.path_in_repo for op in ops]
    return outcome


def same_manifest(a: dict, b: dict) -> bool:
    return {**a, "updated": ""} == {**b, "updated": ""}


def prepared(r: Recipe, commit: str | None) -> tuple[mf.Manifest | None, str]:
    """Whether the staging branch already holds what prepare would make now from source commit `commit`:
    the same source commit, every file the recipe asks for made with its settings, each staged with its
    sha256, its plan and a current quality record. Reads only the branch's file list and small files.
    Returns the staged manifest where it does (None where not), and why."""
    from moeprep import mixes

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
    covered = r.imatrix.quants if r.imatrix else []
    for t in mixes.targets(r.quants, r.mix, r.tensor_types):
        a = m.artifact(t.label)
        s = a.settings if a else None
        if (a is None or a.made_from != base.sha256 or (s.ftype, s.mix, s.tensor_types) != (t.ftype, t.mix, [str(x) for x in t.rules])
                or bool(s.imatrix) != (t.label in covered)):
            return None, f"staging holds no current {t.label}"
    if covered:
        text = r.relative(r.imatrix.calibration)
        i = m.imatrix
        if i is None or (i.text_sha256, i.ctx, i.chunks) != (hashlib.sha256(text.read_bytes()).hexdigest(), r.imatrix.ctx,
                                                             r.imatrix.chunks):
            return None, "the staged importance matrix was made from another text or with other settings"
    for a in m.artifacts:
        if a.size > r.hub.max_shard_bytes and not (a.shards and all(s.max_bytes == r.hub.max_shard_bytes for s in a.shards)):
            return None, f"{a.path} is not staged as shards of {r.hub.max_shard}"
        for path, _, sha, _ in a.upload_files():
            if not staged.holds(path, sha):
                return None, f"staging lacks {path} with the sha256 the manifest lists"
        if a.probe is not None and not a.plans:
            return None, f"staging's manifest records no plan of {a.path}"
    q = staged.quality
    if (q is None or q.reference_sha256 != base.sha256 or not kld.same_method(q.settings, kld.resolved(smoke_settings(r)))
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
    from huggingface_hub import CommitOperationAdd

    from moeprep.stages import smoke as smoke_stage
    from moeprep.stages.pull import pull
    from moeprep.stages.push import commit, token_check

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
    outcome = Outcome("smoke")
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
        commit(r.hub.repo_id, [CommitOperationAdd(path_in_repo=smoke_path(label), path_or_fileobj=data)],
               f"moeprep smoke: {a.path} on {report.hardware.cpu}"
               + "".join(f", {g.name}" for g in report.hardware.gpus), revision=r.hub.staging)
        outcome.made.append(smoke_path(label))
    return outcome


def _label(q: str, labels: list[str], r: Recipe) -> str:
    found = next((x for x in labels if x.upper() == q.upper()), None)
    if found is None:
        raise MoeprepError(f"{r.path} does not smoke {q}", f"its quants and mixes: {', '.join(labels)}")
    return found
