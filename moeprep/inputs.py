"""Inputs read before work starts, each bounded: text files by kind and size, YAML without aliases, and values
quoted in messages by a short prefix only.

A path the user names may be anything: a device that never ends (/dev/zero), a FIFO, a 40 GB log. A YAML file
may define one small value and refer to it a billion times through aliases. Each is refused here, in one line,
before a byte of it is held in memory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from moeprep.errors import MoeprepError

KIB, MIB = 2**10, 2**20


def short(value: object, limit: int = 60) -> str:
    """A value as an error message may quote it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_file(path: Path, limit: int, what: str, hint: str) -> int:
    """The size of `path`, a regular file of at most `limit` bytes, for a program that reads it itself; anything
    else is one error line naming it."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MoeprepError(f"{what} {path} not found", hint) from None
    except OSError as e:
        raise MoeprepError(f"cannot read {what} {path} ({e.strerror})", hint) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise MoeprepError(f"{what} {path} is {kind}", hint)
    if info.st_size > limit:
        raise MoeprepError(f"{what} {path} is {info.st_size:,} bytes; moeprep reads at most {limit:,}", hint)
    return info.st_size


def read_bytes(path: Path, limit: int, what: str, hint: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is one error line naming it."""
    check_file(path, limit, what, hint)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise MoeprepError(f"cannot read {what} {path} ({e.strerror})", hint) from None
    if len(data) > limit:  # it grew while being read
        raise MoeprepError(f"{what} {path} is over {limit:,} bytes; moeprep reads at most {limit:,}", hint)
    return data


def read_text(path: Path, limit: int, what: str, hint: str) -> str:
    data = read_bytes(path, limit, what, hint)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MoeprepError(f"{what} {path} is not UTF-8 text", hint) from None


class _NoAliases(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: no recipe or card needs them, and a few hundred bytes of
    nested aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here", event.start_mark)
        return super().compose_node(parent, index)

    def compose_scalar_node(self, anchor):
        self._no_anchor(anchor)
        return super().compose_scalar_node(anchor)

    def compose_sequence_node(self, anchor):
        self._no_anchor(anchor)
        return super().compose_sequence_node(anchor)

    def compose_mapping_node(self, anchor):
        self._no_anchor(anchor)
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key, _ in node.value:  # YAML keeps the last of two equal keys: a typo would silently win or lose
            if key.tag == "tag:yaml.org,2002:merge":
                raise yaml.composer.ComposerError(None, None, "merge keys (<<) are not allowed here", key.start_mark)
            if key.value in seen:
                raise yaml.composer.ComposerError(None, None, f"the key {short(key.value)} is given twice",
                                                  key.start_mark)
            seen.add(key.value)
        return node

    def _no_anchor(self, anchor) -> None:
        if anchor is not None:
            raise yaml.composer.ComposerError(None, None, f"anchors (&{anchor[:20]}) are not allowed here",
                                              self.peek_event().start_mark)


def load_yaml(text: str) -> object:
    """YAML data, safely, without anchors or aliases. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass
