"""One place that makes progress bars, so one switch (MOEPREP_NO_PROGRESS or --quiet) hides them all."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

_disabled = bool(os.environ.get("MOEPREP_NO_PROGRESS"))


def disable() -> None:
    global _disabled
    _disabled = True


def is_disabled() -> bool:
    return _disabled


def bar(desc: str, total: int | None, unit: str = "B") -> tqdm:
    scaled = unit == "B"
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=sys.stderr,
        disable=_disabled,
        leave=False,
        dynamic_ncols=True,
    )
