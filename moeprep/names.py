"""The names moeprep gives files: a model's name, and every file named after it, are plain names (letters, digits,
`_ . + -`, not starting with a dot or a dash), short enough that `<name>-<QUANT>.gguf.partial` fits a file system's
255 bytes. A model directory or a recipe that gives another name is refused before any work."""

from __future__ import annotations

import re

from moeprep.errors import MoeprepError
from moeprep.inputs import short

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
MAX_NAME = 160  # characters: room for "-IQ2_XXS-00001-of-00009.gguf.partial" and more within 255 bytes


def plain(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and len(name) <= MAX_NAME and ".." not in name


def model_name(name: str, where: str) -> str:
    """`name` as the model's name, which every output file is named after; `where` says where it came from."""
    if not plain(name):
        raise MoeprepError(f"{where} gives the model name {short(name)}, which cannot name its files: moeprep names "
                           f"them <name>-<QUANT>.gguf with letters, digits and _ . + - only, at most {MAX_NAME} long",
                           "rename the directory (or the recipe's name) to such a name")
    return name
