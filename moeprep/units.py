"""Sizes as users write them: 24GiB, 16GB, 8000MiB. A bare number is refused, never read as bytes."""

from __future__ import annotations

import re

from moeprep.errors import MoeprepError
from moeprep.inputs import short
from moeprep.limits import MAX_SIZE

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes in `text`; a number without a unit, or zero, is an error that shows how to write one."""
    m = _SIZE.match(str(text)[:64])
    if not m or len(str(text)) > 64:
        hint = (f"add a unit: {text}GiB or {text}GB" if re.fullmatch(r"\s*\d{1,20}(\.\d+)?\s*", str(text)[:64])
                else "write it like 24GiB, 16GB or 8000MiB")
        raise MoeprepError(f"cannot read {short(str(text))} as a {what}", hint)
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise MoeprepError(f"{what} {short(text)} is zero", "give a positive size, like 50GB")
    if value > MAX_SIZE:
        raise MoeprepError(f"{what} {short(text)} is over 1 PiB", "give a size a machine can have")
    return value
