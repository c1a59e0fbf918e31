"""Pull stage: a repo's (or a staging revision's) manifest and the GGUFs it names, each verified.

The manifest says what every file's sha256 must be; huggingface_hub fetches the bytes into a folder moeprep
makes for them, and only a file whose sha256 is the manifest's is moved into place; a file whose bytes differ
is an error and is removed, never kept. Files already in the output directory with the right sha256 are not
fetched again, so a rerun continues, and a second pull moves nothing. Into a directory that has a manifest,
pull adds what the repo has and the directory lacks, and refuses what would replace a local record.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import inside, make_dirs, remove, sha256_file
from moeprep.hub import errors as hub
from moeprep.hub.repo import HubRepo
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet

SCRATCH = ".moeprep-pull"  # where huggingface_hub writes, inside the output directory, before a file is verified


def parse(spec: str) -> tuple[str, str | None]:
    """ORG/NAME[@REVISION]"""
    repo_id, _, revision = spec.partition("@")
    return hub.check_repo_id(repo_id), revision or None


def remote_manifest(repo: HubRepo, spec: str) -> mf.Manifest:
    local = repo.download(mf.FILENAME)
    try:
        return mf.read(local)
    except MoeprepError as e:
        raise MoeprepError(f"{spec}'s manifest.json is not a moeprep manifest ({e.message})",
                           "pull from a repo that `moeprep push` wrote") from e


def merged(local: mf.Manifest | None, remote: mf.Manifest, out: Path) -> mf.Manifest:
    """The directory's manifest with the repo's records added; a record that would replace a local one is refused."""
    if local is None:
        return remote
    if (local.model, local.source.id) != (remote.model, remote.source.id):
        raise MoeprepError(f"{out} holds the GGUFs of {local.source.id}, not {remote.source.id}",
                           "pull into another --out")
    if local.base and remote.base and local.base.sha256 != remote.base.sha256:
        raise MoeprepError(f"{out}'s {local.base.path} is not the one the repo's files were made from",
                           "pull into another --out")
    for a in remote.artifacts:
        mine = local.artifact_at(a.path) or local.artifact(a.quant)
        if mine is not None and (mine.path, mine.sha256) != (a.path, a.sha256):
            raise MoeprepError(f"pulling would replace the record of {mine.path} in {out / mf.FILENAME} with the "
                               f"repo's {a.path} (other bytes)", "pull into another --out")
        if mine is None:
            local.artifacts.append(a)
    local.smoke = local.smoke or remote.smoke
    local.imatrix = local.imatrix or remote.imatrix
    return local


def pull(spec: str, out: Path, *, quants: list[str] | None = None, status: Status = quiet) -> Outcome[mf.Manifest]:
    """Fetch the manifest at `spec`, then the files of the chosen quants (all without `quants`) into `out`.

    The outcome's result is the Manifest as written to `out`.
    """
    repo = HubRepo(*parse(spec))
    out = Path(out)
    manifest = remote_manifest(repo, spec)
    result = merged(mf.load_or_none(out), manifest, out)
    chosen = manifest.artifacts
    if quants:
        wanted = {q.upper() for q in quants}
        if unknown := wanted - {a.quant.upper() for a in manifest.artifacts}:
            raise MoeprepError(f"{spec} has no {', '.join(sorted(unknown))}",
                               f"it has {', '.join(a.quant for a in manifest.artifacts)}")
        chosen = [a for a in manifest.artifacts if a.quant.upper() in wanted]
    outcome: Outcome[mf.Manifest] = Outcome(Stage.PULL, result=result)
    scratch = out / SCRATCH
    for a in chosen:
        for f in a.upload_files():
            target = inside(out, out / f.path)
            if target.is_file() and target.stat().st_size == f.size and sha256_file(target) == f.sha256:
                outcome.kept.append(f.path)
                continue
            status(f"pulling {repo.repo_id}/{f.path}")
            remove(out, scratch)
            make_dirs(out, scratch)
            try:
                fetched = repo.download_to(f.path, scratch)
            except MoeprepError:
                remove(out, scratch)
                raise
            if fetched.is_symlink() or sha256_file(fetched) != f.sha256:
                remove(out, scratch)
                raise IntegrityError(f"{repo.repo_id}/{f.path} does not have the sha256 its manifest lists",
                                     "the repo's files and manifest disagree: push them again")
            make_dirs(out, target.parent)
            os.replace(fetched, target)
            outcome.made.append(f.path)
    remove(out, scratch)
    mf.save(out, result)
    return outcome
