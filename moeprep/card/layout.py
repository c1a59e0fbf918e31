"""How a directory's artifacts map to Hub repos: one repo for all quants, or one per quant.

The card stage writes one card per repo and push uploads one commit per repo; both ask here, so
they always agree on which card goes with which files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeprep.records.manifest import Artifact, Manifest

LAYOUTS = ("single", "per-quant")


@dataclass
class RepoCard:
    repo_id: str | None  # None: a card for local use, with no Hub usage lines
    artifacts: list[Artifact]
    card: str  # the card's file name in the output directory; uploaded as README.md
    siblings: dict[str, str] = field(default_factory=dict)  # quant -> repo id of the other per-quant repos


def repos(manifest: Manifest, repo_id: str | None, layout: str = "single") -> list[RepoCard]:
    if layout == "single" or repo_id is None:
        return [RepoCard(repo_id, manifest.artifacts, "README.md")]
    ids = {a.quant: f"{repo_id}-{a.quant}" for a in manifest.artifacts}
    return [RepoCard(ids[a.quant], [a], f"README.{a.quant}.md", {q: r for q, r in ids.items() if q != a.quant})
            for a in manifest.artifacts]
