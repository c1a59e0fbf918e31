"""Push stage: GGUFs, card, plot and manifest to the Hub in one commit per repo, through huggingface_hub.

One commit keeps a repo consistent: the card never points at a file that is not there yet. A file
already on the Hub with the same sha256 is left out of the commit, and LFS objects uploaded by an
interrupted run are not sent again (the Hub's LFS batch answer says they are present), so a rerun
continues where the last one stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import card as card_stage
from . import manifest as mf
from .errors import HubError, MoeprepError
from .files import git_blob_sha1, sha256_file
from .manifest import Artifact, Manifest

DEFAULT_SHARD = 50 * 10**9  # many loaders and scripts still assume the Hub's old 50 GB per-file limit


@dataclass
class Item:
    local: str
    path_in_repo: str
    size: int
    action: str  # "upload" or "skip (same sha256 on the Hub)"


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


def shard(out: Path, manifest: Manifest, max_bytes: int, dry_run: bool = False) -> list[str]:
    """Split every artifact larger than `max_bytes` with llama.cpp's shard naming; record the shards."""
    from .split import split

    notes = []
    for a in manifest.artifacts:
        if a.size <= max_bytes:
            a.shards = []
            continue
        if _shards_current(out, a, max_bytes):
            continue
        if dry_run:
            notes.append(f"{a.path} would be split into shards of at most {max_bytes} bytes of tensor data")
            continue
        folder = out / a.quant
        paths = split(out / a.path, folder, max_bytes)
        a.shards = [{"path": str(p.relative_to(out)), "size": p.stat().st_size, "sha256": sha256_file(p),
                     "from": a.sha256, "max_bytes": max_bytes} for p in paths]
        mf.save(out, manifest)
    return notes


def _shards_current(out: Path, a: Artifact, max_bytes: int) -> bool:
    return bool(a.shards) and all(
        s.get("from") == a.sha256 and s.get("max_bytes") == max_bytes and (out / s["path"]).is_file()
        and (out / s["path"]).stat().st_size == s["size"] for s in a.shards)


def _remote(repo_id: str) -> dict[str, str]:
    """path -> sha256 (LFS files) or git blob id (small files) of what the repo holds now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return {f.path: (f.lfs.sha256 if f.lfs else f.blob_id)
                for f in HfApi().list_repo_tree(repo_id, recursive=True) if hasattr(f, "blob_id")}
    except RepositoryNotFoundError:
        return {}


def _items(out: Path, files: list[tuple[Path, str, str | None]], remote: dict[str, str]) -> list[Item]:
    items = []
    for local, path_in_repo, sha in files:
        have = remote.get(path_in_repo)
        small = local.stat().st_size < 10 * 2**20  # the Hub names small files by git blob id, not sha256
        same = have is not None and (have == (sha or sha256_file(local)) or (small and have == git_blob_sha1(local)))
        items.append(Item(str(local.relative_to(out)) if local.is_relative_to(out) else str(local), path_in_repo,
                          local.stat().st_size, "skip (same sha256 on the Hub)" if same else "upload"))
    return items


def _error(e: Exception, repo_id: str) -> MoeprepError:
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return HubError(f"no write access to {repo_id} with this token",
                        "use a token with write permission for that namespace (hf auth login), or pick another --repo-id")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"the Hub answered {status} while pushing to {repo_id}", "run the same command again; --debug shows the response")
    cause = _network_cause(e)
    if cause is None:
        raise e  # not the network: a bug, with its traceback
    return HubError(f"the upload to {repo_id} failed midway ({type(cause).__name__}: {cause})",
                    "run the same command again: files already uploaded are not sent again")


def _network_cause(e: BaseException | None) -> BaseException | None:
    """The transport error behind `e`; huggingface_hub wraps failed LFS uploads in a RuntimeError."""
    import httpx2

    while e is not None:
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _token_check(dry_run: bool) -> None:
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        if dry_run:
            return
        raise HubError("no Hugging Face token is set", "set HF_TOKEN or run `hf auth login` with a write token")
    try:
        HfApi().whoami()
    except Exception as e:
        raise HubError("the Hugging Face token was rejected by the Hub", "create a new write token and set HF_TOKEN") from e


def push(out: Path, repo_id: str, *, private: bool = False, dry_run: bool = False, layout: str = "single",
         max_shard: int = DEFAULT_SHARD, quantized_by: str = "moeprep", base_model: str | None = None,
         template: Path | None = None, status=lambda line: None) -> PushResult:
    from huggingface_hub import HfApi, constants

    out = Path(out)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise MoeprepError(f"{repo_id!r} is not a repo id", "use ORG/NAME")
    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    _token_check(dry_run)
    notes = shard(out, m, max_shard, dry_run)
    for note in notes:
        status(note)
    card_stage.plot(m, out)

    if layout == "single":
        groups = [(repo_id, m.artifacts, [], out / "README.md")]
    else:
        ids = {a.quant: f"{repo_id}-{a.quant}" for a in m.artifacts}
        groups = [(ids[a.quant], [a], [{"quant": q, "url": card_stage.hub_url(r)} for q, r in ids.items() if q != a.quant],
                   out / f"README.{a.quant}.md") for a in m.artifacts]

    api = HfApi()
    result = PushResult(dry_run, [])
    for target, artifacts, siblings, card_path in groups:
        text = card_stage.render(card_stage.CardInput(out, m, target, artifacts, quantized_by, siblings, base_model),
                                 template)
        card_path.write_text(text, encoding="utf-8")
        problems = card_stage.lint(card_path, m)
        if problems:
            raise MoeprepError(f"card lint failed for {card_path.name} ({len(problems)} problem{'s' * (len(problems) != 1)}; "
                               f"first: {problems[0]})",
                               f"run `moeprep card {out} --check {card_path}` to see them all; nothing was pushed")
        files = [(card_path, "README.md", None), (mf.path_in(out), "manifest.json", None)]
        if (out / card_stage.PLOT).is_file():
            files.append((out / card_stage.PLOT, card_stage.PLOT, None))
        for a in artifacts:
            files += [(out / p, p, sha) for p, _, sha, _ in card_stage.files_of(a)]
        remote = _remote(target)
        push_ = RepoPush(target, f"{constants.ENDPOINT}/{target}", _items(out, files, remote))
        result.repos.append(push_)
        if dry_run:
            continue
        todo = [(f, i) for f, i in zip(files, push_.items) if i.action == "upload"]
        if not todo:
            status(f"{target}: every file is already on the Hub with the same sha256; nothing to upload")
            continue
        push_.commit = _commit(api, target, private, todo, m, status)
    return result


def _commit(api, repo_id: str, private: bool, todo, m: Manifest, status) -> str:
    from huggingface_hub import CommitOperationAdd

    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        status(f"{repo_id}: uploading {len(todo)} files in one commit")
        info = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=i.path_in_repo, path_or_fileobj=str(f[0])) for f, i in todo],
            commit_message=f"moeprep: {m.model} GGUF ({', '.join(sorted({a.quant for a in m.artifacts}))})",
        )
    except Exception as e:
        raise _error(e, repo_id) from e
    return info.oid
