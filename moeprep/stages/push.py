"""Push stage: the files the manifest and its card list, to the Hub, in one commit per repo.

Push renders nothing: the card stage wrote the cards, and push lints each once (figures against the
manifest, every file's sha256 against the card) before a byte moves. One commit keeps a repo
consistent: the card never points at a file that is not there yet. A file already on the Hub with
the same sha256 is left out of the commit, and LFS objects uploaded by an interrupted run are not sent
again (the Hub's LFS batch answer says they are present), so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from moeprep.card.layout import repos
from moeprep.card.lint import lint
from moeprep.card.render import PLOT
from moeprep.errors import HubError, MoeprepError
from moeprep.files import git_blob_sha1, sha256_file
from moeprep.hub import errors as hub
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Status, quiet
from moeprep.shell import hint

DEFAULT_SHARD = 50 * 10**9  # many loaders and scripts still assume the Hub's old 50 GB per-file limit
SKIP = "skip (same sha256 on the Hub)"


@dataclass
class Item:
    local: str
    path_in_repo: str
    size: int
    action: str  # "upload" or SKIP


@dataclass
class RepoPush:
    repo_id: str
    url: str
    items: list[Item] = field(default_factory=list)
    commit: str | None = None


@dataclass
class PushResult:
    dry_run: bool
    repos: list[RepoPush]

    @property
    def uploaded(self) -> int:
        return sum(1 for r in self.repos for i in r.items if i.action == "upload")


def remote_files(repo_id: str, revision: str | None) -> dict[str, str]:
    """path -> sha256 (LFS files) or git blob id (small files) of what the repo holds now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return {f.path: (f.lfs.sha256 if f.lfs else f.blob_id)
                for f in HfApi().list_repo_tree(repo_id, recursive=True, revision=revision) if hasattr(f, "blob_id")}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {}
    except Exception as e:
        raise hub.error(e, repo_id, revision=revision) from e


def items(out: Path, files: list[tuple[Path, str, str | None]], remote: dict[str, str]) -> list[Item]:
    items = []
    for local, path_in_repo, sha in files:
        have = remote.get(path_in_repo)
        small = local.stat().st_size < 10 * 2**20  # the Hub names small files by git blob id, not sha256
        same = have is not None and (have == (sha or sha256_file(local)) or (small and have == git_blob_sha1(local)))
        items.append(Item(str(local.relative_to(out)) if local.is_relative_to(out) else str(local), path_in_repo,
                          local.stat().st_size, SKIP if same else "upload"))
    return items


def token_check(dry_run: bool = False) -> None:
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        if dry_run:
            return
        raise HubError("no Hugging Face token is set", "set HF_TOKEN or run `hf auth login` with a write token")
    try:
        HfApi().whoami()
    except Exception as e:
        raise HubError("the Hugging Face token was rejected by the Hub", "create a new write token and set HF_TOKEN") from e


def push(out: Path, repo_id: str, *, layout: str = "single", revision: str | None = None, private: bool = False,
         dry_run: bool = False, status: Status = quiet) -> Outcome:
    """Upload the artifacts, their cards, the plot and the manifest; the outcome's result is a PushResult."""
    out = Path(out)
    hub.check_repo_id(repo_id)
    from huggingface_hub import constants

    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    token_check(dry_run)
    result = PushResult(dry_run, [])
    outcome = Outcome("push", result=result)
    render = hint("moeprep", "card", out, "--repo-id", repo_id, *(["--layout", layout] if layout != "single" else []))
    for repo in repos(m, repo_id, layout):
        card = out / repo.card
        _check_card(card, repo.repo_id, m, render, dry_run)
        files = [(card, "README.md", None)] if card.is_file() else []
        files.append((mf.path_in(out), "manifest.json", None))
        if (out / PLOT).is_file():
            files.append((out / PLOT, PLOT, None))
        for a in repo.artifacts:
            files += [(out / p, p, sha) for p, _, sha, _ in a.upload_files()]
        pushed = RepoPush(repo.repo_id, f"{constants.ENDPOINT}/{repo.repo_id}",
                          items(out, files, remote_files(repo.repo_id, revision)))
        if not card.is_file():  # a dry run before the card is written: say it would go too
            pushed.items.insert(0, Item(repo.card, "README.md", 0, "upload (once `moeprep card` wrote it)"))
        result.repos.append(pushed)
        todo = [(f, i) for f, i in zip(files, pushed.items) if i.action == "upload"]
        outcome.kept += [f"{repo.repo_id}/{i.path_in_repo}" for i in pushed.items if i.action != "upload"]
        if dry_run or not todo:
            if not todo:
                status(f"{repo.repo_id}: every file is already on the Hub with the same sha256; nothing to upload")
            continue
        pushed.commit = _commit(repo.repo_id, revision, private, todo, m, status)
        outcome.made += [f"{repo.repo_id}/{i.path_in_repo}" for _, i in todo]
    return outcome


def _check_card(card: Path, repo_id: str, m: mf.Manifest, render: str, dry_run: bool) -> None:
    """The card is there, was written for this repo, and passes the lint (every file's sha256 included)."""
    if not card.is_file():
        if dry_run:
            return
        raise MoeprepError(f"{card} does not exist: push uploads the card that `moeprep card` wrote",
                           f"run {render} first")
    if not _mentions(card.read_text(encoding="utf-8"), repo_id):
        raise MoeprepError(f"{card} was written for another repo than {repo_id}", f"run {render} first")
    if problems := lint(card, m):
        raise MoeprepError(f"card lint failed for {card.name} ({len(problems)} problem{'s' * (len(problems) != 1)}; "
                           f"first: {problems[0]})",
                           f"run {hint('moeprep', 'card', '--check', card)} to see them all; nothing was pushed")


def _mentions(text: str, repo_id: str) -> bool:
    """The card names this repo (its usage lines do), not merely a longer id that starts the same."""
    return re.search(rf"(?<![\w./-]){re.escape(repo_id)}(?![\w.-])", text) is not None


def _commit(repo_id: str, revision: str | None, private: bool, todo, m: mf.Manifest, status: Status) -> str:
    from huggingface_hub import CommitOperationAdd

    status(f"{repo_id}: uploading {len(todo)} files in one commit")
    return commit(repo_id, [CommitOperationAdd(path_in_repo=i.path_in_repo, path_or_fileobj=str(f[0])) for f, i in todo],
                  f"moeprep: {m.model} GGUF ({', '.join(sorted({a.quant for a in m.artifacts}))})",
                  revision=revision, private=private)


def commit(repo_id: str, operations: list, message: str, *, revision: str | None = None, private: bool = False) -> str:
    """One commit of `operations` (huggingface_hub's CommitOperation*), creating the repo and branch if missing.

    LFS objects the Hub already holds are not sent again (its LFS batch answer says so), so a rerun of an
    interrupted commit continues. Returns the commit's sha.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    from moeprep import progress

    if progress.is_disabled():  # --quiet and MOEPREP_NO_PROGRESS silence the Hub's upload bars too
        disable_progress_bars()
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision)
    except Exception as e:
        raise hub.error(e, repo_id, writing=True) from e
    return info.oid
