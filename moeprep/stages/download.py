"""Download stage: a pinned snapshot of a model's safetensors, config and tokenizer (hub/snapshot.py), each file
checked against the hash the Hub advertises, because snapshot_download itself does not; and the Source record of
a local model directory, its files hashed.
"""

from __future__ import annotations

from pathlib import Path

from moeprep import progress
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import check_free_space, git_blob_sha1, sha256_file
from moeprep.hub.repo import cache_dir
from moeprep.hub.snapshot import RepoSnapshot, download, missing_bytes, resolve, wanted
from moeprep.records.manifest import Source, SourceFile


def check_cache_space(snapshot: RepoSnapshot) -> None:
    check_free_space(cache_dir(), missing_bytes(snapshot), f"the download of {snapshot.repo_id}")


def fetch(repo_id: str, revision: str | None = None, status=lambda line: None) -> tuple[Path, Source]:
    """`moeprep download`: resolve, check the cache has room, download, verify."""
    snap = resolve(repo_id, revision)
    status(f"{repo_id}@{snap.revision} is commit {snap.commit}")
    check_cache_space(snap)
    return verified(snap)


def verified(snapshot: RepoSnapshot) -> tuple[Path, Source]:
    """The snapshot downloaded and every file checked: its folder and the Source record."""
    folder = download(snapshot)
    files = verify(folder, snapshot)
    return folder, Source(snapshot.repo_id, "hub", snapshot.revision, snapshot.commit, files)


def verify(folder: Path, snapshot: RepoSnapshot) -> list[SourceFile]:
    """Hash every downloaded file against the Hub's metadata: a mismatch is an error, never a warning."""
    records = []
    with progress.bar("verifying sha256", snapshot.size) as bar:
        for f in snapshot.files:
            local = folder / f.path
            if not local.is_file():
                raise IntegrityError(f"{f.path} is missing after the download of {snapshot.repo_id}", "run it again")
            digest = sha256_file(local, bar.update)
            if f.sha256 is not None and digest != f.sha256:
                raise IntegrityError(
                    f"{snapshot.repo_id}/{f.path} does not match the sha256 the Hub advertises "
                    f"(got {digest[:12]}…, expected {f.sha256[:12]}…)",
                    "delete it from the HF cache (`hf cache delete`) and download again; if it persists, report it to the repo owner",
                )
            if f.sha256 is None and f.blob_id and git_blob_sha1(local) != f.blob_id:
                raise IntegrityError(
                    f"{snapshot.repo_id}/{f.path} does not match the git blob id the Hub advertises",
                    "delete it from the HF cache (`hf cache delete`) and download again",
                )
            records.append(SourceFile(f.path, local.stat().st_size, digest))
    return records


def local_source(folder: Path) -> Source:
    """Record a local model directory as a Source, hashing the files the converter will read."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and wanted(p.name))
    if not any(n.endswith(".safetensors") for n in names):
        raise MoeprepError(f"{folder} has no .safetensors files", "give a model directory with safetensors weights")
    total = sum((folder / n).stat().st_size for n in names)
    files = []
    with progress.bar("hashing inputs", total) as bar:
        for n in names:
            files.append(SourceFile(n, (folder / n).stat().st_size, sha256_file(folder / n, bar.update)))
    return Source(str(folder.resolve()), "local", None, None, files)
