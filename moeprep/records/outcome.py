"""What every stage returns: what it made, what it kept, and what the user should know.

`release` decides whether a stage did work from `made`, never from the wording of a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

Status = Callable[[str], None]  # one line of what is happening, for humans; stages never print


def quiet(line: str) -> None:
    """The default Status: say nothing."""


class Stage(StrEnum):
    """Every stage, in the order a release runs them (release/pipeline.py), named as --json reports them."""

    DOWNLOAD = "download"
    CONVERT = "convert"
    PROBE = "probe"
    IMATRIX = "imatrix"
    QUANTIZE = "quantize"
    PLAN = "plan"
    QUALITY = "quality"
    SPLIT = "split"
    STAGE = "stage"
    SMOKE = "smoke"
    CARD = "card"
    PROMOTE = "promote"
    PUSH = "push"
    PULL = "pull"
    REVALIDATE = "revalidate"


T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    stage: Stage
    made: list[str] = field(default_factory=list)  # files (or records) this run wrote
    kept: list[str] = field(default_factory=list)  # already up to date, left as they were
    notes: list[str] = field(default_factory=list)  # what the user should know: one line each
    result: T | None = None  # the stage's typed record (a SmokeReport, a PushResult, ...), for output

    @property
    def files(self) -> list[str]:
        return self.made + self.kept

    @property
    def did_work(self) -> bool:
        return bool(self.made)

    def summary(self) -> str:
        if self.made:
            return f"made {', '.join(self.made)}"
        return "up to date" + (f" ({len(self.kept)} kept)" if self.kept else "")
