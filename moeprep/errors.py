"""The one error type moeprep shows to users.

Stages raise MoeprepError with a message (what failed) and a hint (what to do next);
cli.py renders it as one line and exits 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoeprepError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class HubError(MoeprepError):
    """Something the Hub said no to: missing repo, gated access, bad revision."""


class IntegrityError(MoeprepError):
    """Bytes that are not what they claim to be: sha256 mismatch, corrupt or truncated files."""
