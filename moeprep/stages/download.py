"""Download stage: a pinned snapshot of a model's safetensors, config and tokenizer from the Hub.

huggingface_hub does the transfer (HF cache, HF_TOKEN, HF_ENDPOINT); moeprep resolves the revision
to a commit, refuses anything that is not plain data, and checks every file against the hash the Hub
advertises, because snapshot_download itself does not.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from moeprep import progress
from moeprep.errors import HubError, IntegrityError, MoeprepError
from moeprep.files import git_blob_sha1, sha256_file
from moeprep.hub import errors as hub
from moeprep.records.manifest import Source, SourceFile

# Weights as safetensors only, plus what the converter reads. No *.py: remote code never reaches disk,
# no *.bin/*.pt: pickles are never loaded.
WANTED = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "README.md",
    "LICENSE*",
]


def wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in WANTED)


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the sha256 the Hub advertises
    blob_id: str | None  # small files: the git blob id


@dataclass
class RepoSnapshot:
    """What a revision of a repo holds, before anything is downloaded."""

    repo_id: str
    revision: str
    commit: str
    gated: bool
    files: list[RemoteFile]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def resolve(repo_id: str, revision: str | None = None) -> RepoSnapshot:
    """Ask the Hub which commit `revision` is and which files (with sizes and hashes) it holds."""
    from huggingface_hub import HfApi, constants, get_token

    revision = revision or "main"
    hub.check_repo_id(repo_id)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise hub.error(e, repo_id, revision=revision) from e
    files = [
        RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in info.siblings or []
        if wanted(s.rfilename)
    ]
    if not any(f.path.endswith(".safetensors") for f in files):
        raise MoeprepError(
            f"{repo_id}@{revision} has no .safetensors weights",
            "moeprep converts safetensors only; pick a revision or repo that has them",
        )
    gated = bool(info.gated)
    if gated and not get_token():
        raise HubError(
            f"{repo_id} is a gated repo and no Hugging Face token is set",
            f"accept its terms at {constants.ENDPOINT}/{repo_id}, then set HF_TOKEN or run `hf auth login`",
        )
    return RepoSnapshot(repo_id, revision, info.sha, gated, files)


def missing(snapshot: RepoSnapshot) -> list[RemoteFile]:
    """Files of the snapshot not yet in the HF cache: what a download will fetch."""
    from huggingface_hub import try_to_load_from_cache

    return [f for f in snapshot.files
            if not isinstance(try_to_load_from_cache(snapshot.repo_id, f.path, revision=snapshot.commit), str)]


def missing_bytes(snapshot: RepoSnapshot) -> int:
    return sum(f.size for f in missing(snapshot))


def check_cache_space(snapshot: RepoSnapshot) -> None:
    from huggingface_hub import constants

    from moeprep.files import check_free_space

    check_free_space(Path(constants.HF_HUB_CACHE), missing_bytes(snapshot), f"the download of {snapshot.repo_id}")


def fetch_config(snapshot: RepoSnapshot) -> Path:
    """config.json alone, verified, so the architecture is checked before 80 GB of weights move."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(snapshot.repo_id, "config.json", revision=snapshot.commit))
    except Exception as e:
        raise hub.error(e, snapshot.repo_id, revision=snapshot.revision) from e
    remote = next((f for f in snapshot.files if f.path == "config.json"), None)
    if remote and remote.blob_id and git_blob_sha1(path) != remote.blob_id:
        raise IntegrityError(f"{snapshot.repo_id}/config.json does not match the git blob id the Hub advertises",
                             "delete it from the HF cache (`hf cache delete`) and download again")
    return path


def download(snapshot: RepoSnapshot) -> tuple[Path, Source]:
    """Fetch the snapshot into the HF cache and verify every file; returns its folder and the Source record."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if progress.is_disabled():
        disable_progress_bars()
    try:
        folder = Path(
            snapshot_download(
                snapshot.repo_id,
                revision=snapshot.commit,
                allow_patterns=[f.path for f in snapshot.files],
            )
        )
    except Exception as e:
        raise hub.error(e, snapshot.repo_id, revision=snapshot.revision) from e
    files = verify(folder, snapshot)
    source = Source(snapshot.repo_id, "hub", snapshot.revision, snapshot.commit, files)
    return folder, source


def fetch(repo_id: str, revision: str | None = None, status=lambda line: None) -> tuple[Path, Source]:
    """`moeprep download`: resolve, check the cache has room, download, verify."""
    snap = resolve(repo_id, revision)
    status(f"{repo_id}@{snap.revision} is commit {snap.commit}")
    check_cache_space(snap)
    return download(snap)


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
