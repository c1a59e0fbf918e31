"""What a re-validation found, kept in the manifest: the card's changelog is rendered from these, so figures that
moved are never rewritten silently and the old ones stay readable."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Change:
    """One figure (or state) that moved: where, what it was, what it is now."""

    file: str
    what: str  # "gpu decode tok/s", "cpu-moe", "mean KLD"
    before: str
    after: str


@dataclass
class ChangeEntry:
    """One re-validation that found something: when, with which llama.cpp builds, and every figure that moved."""

    date: str  # ISO date (UTC) of the re-validation
    llama_cpp_before: str | None
    llama_cpp_after: str | None
    changes: list[Change] = field(default_factory=list)
