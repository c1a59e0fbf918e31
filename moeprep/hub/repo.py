"""One repo at one revision on the Hub, and the one way moeprep commits to it.

`HubRepo` lists a revision's files (path -> sha256 for LFS files, git blob id for small ones), reads its small
JSON files (bounded), downloads a file into the Hub's cache or into a folder, and commits. `plan_commit` decides,
for push, stage and promote alike, which of the files wanted are already there with the same bytes and which go
into the commit: an upload of local bytes, or a copy of a file another revision already holds (no byte moves).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    HfApi,
    constants,
    get_token,
    hf_hub_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import disable_progress_bars

from moeprep import progress
from moeprep.errors import HubError, MoeprepError
from moeprep.hub.errors import error

MAX_JSON = 64 * 2**20  # the largest JSON file moeprep writes to a repo (a manifest) is a few MB


def endpoint() -> str:
    """The Hub moeprep talks to (HF_ENDPOINT), as links to it begin."""
    return constants.ENDPOINT.rstrip("/")


def cache_dir() -> Path:
    return Path(constants.HF_HUB_CACHE)


def cached(repo_id: str, path: str, revision: str | None) -> Path | None:
    """A file of the Hub's cache at `revision`, if it is there; nothing is downloaded."""
    found = try_to_load_from_cache(repo_id, path, revision=revision)
    return Path(found) if isinstance(found, str) else None


def quiet() -> None:
    """huggingface_hub's own progress bars follow moeprep's switch (--quiet, MOEPREP_NO_PROGRESS)."""
    if progress.is_disabled():
        disable_progress_bars()


def token_check(dry_run: bool = False) -> None:
    """A token the Hub accepts is set; a dry run may go without one. The token is never shown."""
    if get_token() is None:
        if dry_run:
            return
        raise HubError("no Hugging Face token is set", "set HF_TOKEN or run `hf auth login` with a write token")
    try:
        HfApi().whoami()
    except Exception as e:
        raise HubError("the Hugging Face token was rejected by the Hub", "create a new write token and set HF_TOKEN") from e


def blob_ids(data: bytes) -> set[str]:
    """The ids the Hub may list a small file under: its git blob id, or its sha256 when it stored it in LFS."""
    return {hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class Want:
    """A file a commit should leave in the repo: from local bytes (a path or the bytes themselves), or copied
    from `copy_from`, another revision of the same repo that holds it. `sha256` is what the repo must then hold
    (for small files given as bytes, their blob ids are compared instead)."""

    path_in_repo: str
    sha256: str | None = None
    local: Path | bytes | None = None
    copy_from: str | None = None  # a revision (commit sha) of this repo


@dataclass
class HubRepo:
    repo_id: str
    revision: str | None = None  # None: main

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def url(self) -> str:
        return f"{endpoint()}/{self.repo_id}"

    def commit_sha(self) -> str | None:
        """The commit the revision is at now; None when the repo or the revision does not exist yet."""
        try:
            return HfApi().repo_info(self.repo_id, revision=self.revision).sha
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as e:
            raise error(e, self.repo_id, revision=self.revision) from e

    def files(self) -> dict[str, str]:
        """path -> sha256 (LFS files) or git blob id (small files); empty when the repo or revision is missing."""
        try:
            return {f.path: (f.lfs.sha256 if f.lfs else f.blob_id)
                    for f in HfApi().list_repo_tree(self.repo_id, recursive=True, revision=self.revision)
                    if isinstance(f, RepoFile)}
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return {}
        except Exception as e:
            raise error(e, self.repo_id, revision=self.revision) from e

    def download(self, path: str) -> Path:
        """One file into the Hub's cache (verified by the caller against what it expects)."""
        quiet()
        try:
            return Path(hf_hub_download(self.repo_id, path, revision=self.revision))
        except Exception as e:
            raise error(e, self.repo_id, revision=self.revision) from e

    def download_to(self, path: str, folder: Path) -> Path:
        """One file into `folder` (a folder of moeprep's own, made for it), not the cache."""
        quiet()
        try:
            return Path(hf_hub_download(self.repo_id, path, revision=self.revision, local_dir=folder))
        except Exception as e:
            raise error(e, self.repo_id, revision=self.revision) from e

    def read_json(self, path: str) -> object:
        local = self.download(path)
        if local.stat().st_size > MAX_JSON:
            raise MoeprepError(f"{self.where}: {path} is larger than {MAX_JSON // 2**20} MiB, so moeprep did not write it",
                               "run the job that wrote it again")
        try:
            return json.loads(local.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoeprepError(f"{self.where}: {path} is not JSON ({str(e)[:100]})", "run the job that wrote it again") from e

    def commit(self, wanted: list[Want], message: str, *, private: bool = False) -> str:
        """One commit of the files in `wanted`, creating the repo and the branch if missing; returns its sha.

        LFS objects the Hub already holds are not sent again (its LFS batch answer says so), so a rerun of an
        interrupted commit continues."""
        quiet()
        operations: list = []
        for w in wanted:
            if w.copy_from is not None:
                operations.append(CommitOperationCopy(src_path_in_repo=w.path_in_repo, path_in_repo=w.path_in_repo,
                                                      src_revision=w.copy_from))
            else:
                if w.local is None:
                    raise ValueError(f"{w.path_in_repo}: a file to commit needs local bytes or a revision to copy from")
                source = str(w.local) if isinstance(w.local, Path) else w.local
                operations.append(CommitOperationAdd(path_in_repo=w.path_in_repo, path_or_fileobj=source))
        api = HfApi()
        try:
            api.create_repo(self.repo_id, private=private, exist_ok=True)
            if self.revision and self.revision != "main":
                api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
            info = api.create_commit(self.repo_id, operations=operations, commit_message=message, revision=self.revision)
        except Exception as e:
            raise error(e, self.repo_id, writing=True) from e
        return info.oid


def plan_commit(wanted: list[Want], remote: dict[str, str]) -> tuple[list[Want], list[str]]:
    """What a commit must carry, and what the repo already holds with the same bytes (kept)."""
    todo, kept = [], []
    for w in wanted:
        have = remote.get(w.path_in_repo)
        if isinstance(w.local, bytes):
            same = have in blob_ids(w.local)
        else:
            same = have is not None and (have == w.sha256 or (isinstance(w.local, Path) and _small_same(w.local, have)))
        (kept.append(w.path_in_repo) if same else todo.append(w))
    return todo, kept


def _small_same(path: Path, have: str) -> bool:
    """A small file the Hub names by its git blob id rather than a sha256."""
    return path.stat().st_size < 10 * 2**20 and have in blob_ids(path.read_bytes())
