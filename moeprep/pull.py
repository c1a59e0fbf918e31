"""Pull stage: a repo's (or a staging revision's) manifest and the GGUFs it names, each verified.

The manifest says what every file's sha256 must be; huggingface_hub fetches the bytes, and a file
whose bytes differ is an error and is removed, never kept. Files already in the output directory with
the right sha256 are not fetched again, so a rerun continues, and a second pull moves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import hub
from . import manifest as mf
from .errors import IntegrityError, MoeprepError
from .files import sha256_file, write_json
from .outcome import Outcome, Status, quiet


def parse(spec: str) -> tuple[str, str | None]:
    """ORG/NAME[@REVISION]"""
    repo_id, _, revision = spec.partition("@")
    return hub.check_repo_id(repo_id), revision or None


def pull(spec: str, out: Path, *, quants: list[str] | None = None, status: Status = quiet) -> Outcome:
    """Fetch the manifest at `spec` into `out`, then the files of the chosen quants (all without `quants`).

    The outcome's result is the Manifest.
    """
    from huggingface_hub import hf_hub_download

    from . import progress

    repo_id, revision = parse(spec)
    out = Path(out)
    try:
        remote = Path(hf_hub_download(repo_id, mf.FILENAME, revision=revision))
    except Exception as e:
        raise hub.error(e, repo_id, revision=revision) from e
    try:
        manifest = mf.Manifest.from_dict(json.loads(remote.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, MoeprepError) as e:
        raise MoeprepError(f"{spec}'s manifest.json is not a moeprep manifest ({e})",
                           "pull from a repo that `moeprep push` wrote") from e
    local = mf.load_or_none(out)
    if local is not None and (local.model, local.source.id) != (manifest.model, manifest.source.id):
        raise MoeprepError(f"{out} holds the GGUFs of {local.source.id}, not {manifest.source.id}",
                           "pull into another --out")
    chosen = manifest.artifacts
    if quants:
        wanted = {q.upper() for q in quants}
        if unknown := wanted - {a.quant.upper() for a in manifest.artifacts}:
            raise MoeprepError(f"{spec} has no {', '.join(sorted(unknown))}",
                               f"it has {', '.join(a.quant for a in manifest.artifacts)}")
        chosen = [a for a in manifest.artifacts if a.quant.upper() in wanted]
    outcome = Outcome("pull", result=manifest)
    if progress.is_disabled():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    for a in chosen:
        for path, size, sha, _ in a.upload_files():
            target = out / path
            if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha:
                outcome.kept.append(path)
                continue
            status(f"pulling {repo_id}/{path}")
            try:
                hf_hub_download(repo_id, path, revision=revision, local_dir=out)
            except Exception as e:
                raise hub.error(e, repo_id, revision=revision) from e
            if sha256_file(target) != sha:
                target.unlink(missing_ok=True)
                raise IntegrityError(f"{repo_id}/{path} does not have the sha256 its manifest lists",
                                     "the repo's files and manifest disagree: push them again")
            outcome.made.append(path)
    write_json(mf.path_in(out), manifest.to_dict())
    return outcome
