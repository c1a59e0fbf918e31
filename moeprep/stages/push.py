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

from moeprep import progress
from moeprep.card.layout import repos
from moeprep.card.lint import lint
from moeprep.card.render import PLOT
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import matches
from moeprep.hub import errors as hub
from moeprep.hub.repo import HubRepo, Want, plan_commit, token_check
from moeprep.records import manifest as mf
from moeprep.records.manifest import UploadFile
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.shell import hint

DEFAULT_SHARD = 50 * 10**9  # many loaders and scripts still assume the Hub's old 50 GB per-file limit
SKIP = "skip (same sha256 on the Hub)"
UPLOAD = "upload"


@dataclass
class Item:
    local: str
    path_in_repo: str
    size: int
    action: str  # UPLOAD or SKIP


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
        return sum(1 for r in self.repos for i in r.items if i.action == UPLOAD)


def push(out: Path, repo_id: str, *, layout: str = "single", revision: str | None = None, private: bool = False,
         dry_run: bool = False, status: Status = quiet) -> Outcome[PushResult]:
    """Upload the artifacts, their cards, the plot and the manifest; the outcome's result is a PushResult."""
    out = Path(out)
    repo_id = hub.check_repo_id(repo_id)

    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    token_check(dry_run)
    result = PushResult(dry_run, [])
    outcome: Outcome[PushResult] = Outcome(Stage.PUSH, result=result)
    imatrix = m.imatrix_file()
    for f in [f for a in m.artifacts for f in a.upload_files()] + ([imatrix] if imatrix else []):  # before any commit
        _check_bytes(out / f.path, f, dry_run)
    render = hint("moeprep", "card", out, "--repo-id", repo_id, *(["--layout", layout] if layout != "single" else []))
    for repo in repos(m, repo_id, layout):
        card = out / repo.card
        target_id = repo.repo_id or repo_id  # given a repo id, every card is for a repo
        _check_card(card, target_id, m, render, dry_run)
        wanted = [Want("README.md", local=card)] if card.is_file() else []
        wanted.append(Want(mf.FILENAME, local=mf.path_in(out)))
        if (out / PLOT).is_file():
            wanted.append(Want(PLOT, local=out / PLOT))
        for a in repo.artifacts:
            wanted += [Want(f.path, f.sha256, local=out / f.path) for f in a.upload_files()]
        if imatrix and any(a.settings.imatrix for a in repo.artifacts):  # published beside the files made with it
            wanted.append(Want(imatrix.path, imatrix.sha256, local=out / imatrix.path))
        target = HubRepo(target_id, revision)
        todo, kept = plan_commit(wanted, target.files())
        pushed = RepoPush(target_id, target.url(), [
            Item(_relative(w.local, out), w.path_in_repo, w.local.stat().st_size,
                 SKIP if w.path_in_repo in kept else UPLOAD) for w in wanted if isinstance(w.local, Path)])
        if not card.is_file():  # a dry run before the card is written: say it would go too
            pushed.items.insert(0, Item(repo.card, "README.md", 0, "upload (once `moeprep card` wrote it)"))
        result.repos.append(pushed)
        outcome.kept += [f"{target_id}/{path}" for path in kept]
        if dry_run or not todo:
            if not todo:
                status(f"{target_id}: every file is already on the Hub with the same sha256; nothing to upload")
            continue
        status(f"{target_id}: uploading {len(todo)} files in one commit")
        pushed.commit = target.commit(todo, f"moeprep: {m.model} GGUF ({', '.join(sorted({a.quant for a in m.artifacts}))})",
                                      private=private)
        outcome.made += [f"{target_id}/{w.path_in_repo}" for w in todo]
    return outcome


def _check_bytes(path: Path, f: UploadFile, dry_run: bool) -> None:
    """The bytes about to be uploaded are the bytes the manifest and the card name: hashed now, whatever the file's
    size and time say, since what goes to the Hub is published under this sha256."""
    if dry_run:
        return
    size = f.size if f.size >= 0 else (path.stat().st_size if path.is_file() else 0)  # not recorded: the sha256 decides
    with progress.bar(f"sha256 {f.path}", size) as bar:
        same = path.is_file() and not path.is_symlink() and matches(path, size, f.sha256, None, bar.update)
    if not same:
        raise IntegrityError(f"{path} is not the bytes the manifest lists (sha256 differs, or it is missing)",
                             "make it again (`moeprep convert`), or pull it again; nothing was pushed")


def _relative(local: Path, out: Path) -> str:
    return str(local.relative_to(out)) if local.is_relative_to(out) else str(local)


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
