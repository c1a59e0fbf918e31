"""Download stage: a pinned snapshot of a model's safetensors, config and tokenizer from the Hub.

huggingface_hub does the transfer (HF cache, HF_TOKEN, HF_ENDPOINT); moeprep resolves the revision
to a commit, refuses anything that is not plain data, and checks every file against the hash the Hub
advertises, because snapshot_download itself does not.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from . import progress
from .errors import HubError, IntegrityError, MoeprepError
from .files import git_blob_sha1, sha256_file
from .manifest import Source, SourceFile

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


def _hub_error(e: Exception, repo_id: str, revision: str) -> MoeprepError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{constants.ENDPOINT}/{repo_id}"
    if isinstance(e, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated repo and this token has no access to it",
            f"accept its terms at {url}, then set HF_TOKEN or run `hf auth login`",
        )
    if isinstance(e, RepositoryNotFoundError):
        return HubError(
            f"repo {repo_id} not found on {constants.ENDPOINT}",
            "check the id; if it is private, set HF_TOKEN to a token that can read it",
        )
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id}", f"see the branches and tags at {url}")
    if isinstance(e, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, so the Hub cannot be asked", "unset it, or convert a local directory")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return HubError(f"the Hub answered {status} for {repo_id}", "try again later; --debug shows the response")
    return HubError(
        f"cannot reach the Hub at {constants.ENDPOINT} ({type(e).__name__})",
        "check the network, or HF_ENDPOINT if you set it",
    )


def resolve(repo_id: str, revision: str | None = None) -> RepoSnapshot:
    """Ask the Hub which commit `revision` is and which files (with sizes and hashes) it holds."""
    from huggingface_hub import HfApi, constants, get_token

    revision = revision or "main"
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise _hub_error(e, repo_id, revision) from e
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


def missing_bytes(snapshot: RepoSnapshot) -> int:
    """Bytes of the snapshot not yet in the HF cache: what a download will write."""
    from huggingface_hub import try_to_load_from_cache

    return sum(f.size for f in snapshot.files
               if not isinstance(try_to_load_from_cache(snapshot.repo_id, f.path, revision=snapshot.commit), str))


def check_cache_space(snapshot: RepoSnapshot) -> None:
    from huggingface_hub import constants

    from .files import check_free_space

    check_free_space(Path(constants.HF_HUB_CACHE), missing_bytes(snapshot), f"the download of {snapshot.repo_id}")


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
        raise _hub_error(e, snapshot.repo_id, snapshot.revision) from e
    files = verify(folder, snapshot)
    source = Source(snapshot.repo_id, "hub", snapshot.revision, snapshot.commit, files)
    return folder, source


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
