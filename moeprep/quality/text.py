"""The text quality is measured on: moeprep's own evaluation text, or one the user gives, with its sha256."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from moeprep.inputs import read_text
from moeprep.limits import MAX_EVAL_TEXT

EVAL_TEXT = "eval-en.txt"  # moeprep/data/: original prose written for moeprep, MIT (see moeprep/data/README.md)


@dataclass(frozen=True)
class EvalText:
    """The text quality is measured on: its name, the sha256 of its file, and the bytes llama-perplexity reads."""

    name: str
    sha256: str
    data: bytes  # as `llama-perplexity -f` reads the file: less one trailing newline


def eval_text(path: Path | None = None) -> EvalText:
    """moeprep's own evaluation text, or the text file at `path`."""
    if path is None:

        raw = (files("moeprep") / "data" / EVAL_TEXT).read_bytes()
        name = EVAL_TEXT
    else:
        path = Path(path)
        raw = read_text(path, MAX_EVAL_TEXT, "the evaluation text",
                        "give a UTF-8 text file, or leave --quality-text out for moeprep's own").encode("utf-8")
        name = path.name
    return EvalText(name, hashlib.sha256(raw).hexdigest(), raw.removesuffix(b"\n"))
