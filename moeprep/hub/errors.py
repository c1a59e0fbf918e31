"""Everything Hub-facing that more than one stage needs: repo ids, URLs, and what Hub errors mean.

Every Hub exception meets `error()`, which turns it into one HubError with a next step; anything
that is not the Hub or the network is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

import httpx2
from huggingface_hub import constants, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from moeprep.errors import HubError, MoeprepError
from moeprep.inputs import short

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}")  # the Hub's names, ASCII only


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".", "-")):
        raise MoeprepError(f"{short(repo_id)} is not a Hub repo id", "use ORG/NAME")
    return repo_id


def url(repo_id: str) -> str:
    return f"{constants.ENDPOINT}/{repo_id}"


def network_cause(e: BaseException | None) -> BaseException | None:
    """The transport error behind `e`; huggingface_hub wraps failed LFS uploads in a RuntimeError."""
    while e is not None:
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def error(e: Exception, repo_id: str, *, revision: str | None = None, writing: bool = False) -> MoeprepError:
    """One HubError, with what to do next, for an exception raised while talking to the Hub."""
    where = url(repo_id)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        if get_token() is None:
            return HubError(f"{repo_id} is a gated repo and no Hugging Face token is set",
                            f"accept its terms at {where}, then set HF_TOKEN or run `hf auth login`")
        return HubError(f"{repo_id} is a gated repo and this token has no access to it",
                        f"accept its terms at {where} with the account the token belongs to")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id}", f"see the branches and tags at {where}")
    if isinstance(e, RepositoryNotFoundError) and not writing:
        return HubError(f"repo {repo_id} not found on {constants.ENDPOINT}",
                        "check the id; if it is private, set HF_TOKEN to a token that can read it")
    if isinstance(e, OfflineModeIsEnabled):
        return HubError("HF_HUB_OFFLINE is set, so the Hub cannot be asked", "unset it, or convert a local directory")
    if isinstance(e, (HfHubHTTPError, RepositoryNotFoundError)) and (status in (401, 403) or writing and status == 404):
        if writing:
            return HubError(f"no write access to {repo_id} with this token",
                            "use a token with write permission for that namespace (hf auth login), or pick another repo id")
        return HubError(f"the Hub refused access to {repo_id} ({status})", "set HF_TOKEN to a token that can read it")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"the Hub answered {status or '?'} for {repo_id}", "run the same command again later; --debug shows the response")
    cause = network_cause(e)
    if cause is None and not isinstance(e, (OSError, ValueError)):
        raise e  # neither the Hub nor the network: a bug, with its traceback
    if writing:
        return HubError(f"the upload to {repo_id} failed midway ({type(cause or e).__name__}: {cause or e})",
                        "run the same command again: files already uploaded are not sent again")
    return HubError(f"cannot reach the Hub at {constants.ENDPOINT} ({type(cause or e).__name__})",
                    "check the network, or HF_ENDPOINT if you set it")
