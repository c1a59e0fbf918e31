"""Commands as moeprep prints them: in hints, in output and in cards, each argument shell-quoted, so a path or a
repo id with spaces, semicolons or `$(...)` in it is pasted as one argument and runs nothing."""

from __future__ import annotations

import shlex


def command(*args: object) -> str:
    """`moeprep ...` with every argument quoted for a POSIX shell."""
    return shlex.join(str(a) for a in args)


def hint(*args: object) -> str:
    """A command inside an error's hint, in backticks as the hints write them."""
    return f"`{command(*args)}`"
