"""A pinned snapshot of a model repo: which commit a revision is, which files it holds with the hashes the Hub
advertises, and the download of exactly those files (into the Hub's cache) by huggingface_hub.

Only plain data is wanted: safetensors weights, config and tokenizer files, the README and licenses. Never
`*.py` (remote code never reaches disk) and never pickles (`*.bin`, `*.pt`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token, hf_hub_download, snapshot_download, try_to_load_from_cache

from moeprep.errors import HubError, IntegrityError, MoeprepError
from moeprep.files import git_blob_sha1
from moeprep.hub.errors import check_repo_id, error
from moeprep.hub.repo import endpoint, quiet

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
    revision = revision or "main"
    check_repo_id(repo_id)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        raise error(e, repo_id, revision=revision) from e
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
            f"accept its terms at {endpoint()}/{repo_id}, then set HF_TOKEN or run `hf auth login`",
        )
    if info.sha is None:
        raise HubError(f"the Hub did not say which commit {repo_id}@{revision} is", "try again later")
    return RepoSnapshot(repo_id, revision, info.sha, gated, files)


def missing(snapshot: RepoSnapshot) -> list[RemoteFile]:
    """Files of the snapshot not yet in the HF cache: what a download will fetch."""
    return [f for f in snapshot.files
            if not isinstance(try_to_load_from_cache(snapshot.repo_id, f.path, revision=snapshot.commit), str)]


def missing_bytes(snapshot: RepoSnapshot) -> int:
    return sum(f.size for f in missing(snapshot))


def fetch_config(snapshot: RepoSnapshot) -> Path:
    """config.json alone, verified, so the architecture is checked before 80 GB of weights move."""
    try:
        path = Path(hf_hub_download(snapshot.repo_id, "config.json", revision=snapshot.commit))
    except Exception as e:
        raise error(e, snapshot.repo_id, revision=snapshot.revision) from e
    remote = next((f for f in snapshot.files if f.path == "config.json"), None)
    if remote and remote.blob_id and git_blob_sha1(path) != remote.blob_id:
        raise IntegrityError(f"{snapshot.repo_id}/config.json does not match the git blob id the Hub advertises",
                             "delete it from the HF cache (`hf cache delete`) and download again")
    return path


def download(snapshot: RepoSnapshot) -> Path:
    """Fetch the snapshot's files into the HF cache; returns its folder. snapshot_download does not compare the
    bytes with the hashes the Hub advertises: the caller verifies them (stages/download.py)."""
    quiet()
    try:
        folder = Path(
            snapshot_download(
                snapshot.repo_id,
                revision=snapshot.commit,
                allow_patterns=[f.path for f in snapshot.files],
            )
        )
    except Exception as e:
        raise error(e, snapshot.repo_id, revision=snapshot.revision) from e
    return folder
