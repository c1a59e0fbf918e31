"""The card lint: what must hold before a card may be pushed.

Front matter, merge markers, unrendered template syntax, empty cells, placeholders, links that would
404 on the Hub, and the file table against the manifest: every figure equal to the manifest's, every
file present with the sha256 the card lists.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import manifest as mf
from .card import COLUMNS, QUALITY_COLUMNS, file_rows, quality_rows
from .errors import MoeprepError
from .files import sha256_file
from .manifest import Manifest

REQUIRED = ["base_model", "base_model_relation", "license", "tags", "quantized_by"]
_MARKER = re.compile(r"^(<{7}( .*)?|={7}|>{7}( .*)?)$")
_LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)|(?:src|href)=\"([^\"]+)\"")
_PLACEHOLDER = re.compile(r"\((add|tbd|todo)\)", re.IGNORECASE)


def lint(path: Path, manifest: Manifest | None = None, check_files: bool = True) -> list[str]:
    """Problems with the card at `path`; an empty list means it may be pushed."""
    path = Path(path)
    if not path.is_file():
        raise MoeprepError(f"{path} does not exist", "render it with `moeprep card DIR` first")
    if manifest is None:
        manifest = mf.load_or_none(path.parent)
    return lint_text(path.read_text(encoding="utf-8", errors="replace"), path, manifest, check_files)


def lint_text(text: str, path: Path, manifest: Manifest | None, check_files: bool = True) -> list[str]:
    lines = text.splitlines()
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        if _MARKER.match(line):
            problems.append(f"line {n}: merge-conflict marker {line[:7]!r}")
        if "{{" in line or "{%" in line:
            problems.append(f"line {n}: unrendered template syntax")
        if line.strip().startswith("|") and not re.fullmatch(r"\|[\s|:-]*\|", line.strip()):
            if any(c == "" for c in _cells(line)):
                problems.append(f"line {n}: empty table cell")
        if m := _PLACEHOLDER.search(line):
            problems.append(f"line {n}: placeholder {m.group(0)}")
    problems += _front_matter(text)
    problems += _links(lines, path.parent)
    if manifest is None:
        problems.append("no manifest.json beside the card: its figures and checksums cannot be verified")
    else:
        problems += [f"manifest: {p}; convert again" for p in manifest.chain_problems()]
        problems += _figures(lines, manifest, path.parent, check_files)
        problems += _quality(lines, manifest)
    return problems


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _front_matter(text: str) -> list[str]:
    if not text.startswith("---\n"):
        return ["front matter: the card does not start with a YAML block (---)"]
    end = text.find("\n---\n", 4)
    if end < 0:
        return ["front matter: no closing --- line"]
    try:
        meta = yaml.safe_load(text[4:end])
    except yaml.YAMLError as e:
        return [f"front matter: not valid YAML ({str(e).splitlines()[0]})"]
    if not isinstance(meta, dict):
        return ["front matter: not a mapping"]
    problems = [f"front matter: missing {key}" for key in REQUIRED if not meta.get(key)]
    if meta.get("base_model_relation") not in (None, "quantized"):
        problems.append("front matter: base_model_relation must be quantized")
    if "gguf" not in (meta.get("tags") or []):
        problems.append("front matter: tags lack gguf")
    return problems


def _links(lines: list[str], folder: Path) -> list[str]:
    problems = []
    for n, line in enumerate(lines, 1):
        for m in _LINK.finditer(line):
            url = m.group(1) or m.group(2)
            if re.match(r"^(https?://|mailto:|#)", url):
                continue
            if not url.startswith(("/", "..")) and (folder / url).is_file():
                continue  # a file of this repo, uploaded beside the card
            problems.append(f"line {n}: relative link {url!r} does not resolve on the Hub; "
                            "link other repos as absolute https://huggingface.co/ORG/NAME URLs")
    return problems


def _table(lines: list[str], columns: list[str]) -> list[list[str]] | None:
    """The rows of the table under the header moeprep writes for `columns`; None if there is no such table."""
    header = "| " + " | ".join(columns) + " |"
    if header not in lines:
        return None
    found = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        found.append(_cells(line))
    return found


def _figures(lines: list[str], manifest: Manifest, folder: Path, check_files: bool) -> list[str]:
    found = _table(lines, COLUMNS)
    if found is None:
        return ["file table: not found (its header must be the one moeprep writes)"]
    listed = {row[0] for row in found}
    artifacts = [a for a in manifest.artifacts if any(p in listed for p, *_ in a.upload_files())]
    by_file = {row[0]: row for row in file_rows(manifest, artifacts)}
    problems = []
    for row in found:
        want = by_file.get(row[0])
        if want is None:
            problems.append(f"file table: {row[0]} is not an artifact in the manifest")
            continue
        for col, got, exp in zip(COLUMNS, row, want):
            if got != exp:
                problems.append(f"file table: {row[0]}: {col} is {got!r}, the manifest says {exp!r}")
        if check_files:
            local = folder / row[0]
            if not local.is_file():
                problems.append(f"file table: {row[0]} does not exist beside the card")
            elif sha256_file(local) != want[3]:
                problems.append(f"file table: {row[0]} does not have the sha256 the card lists")
    if not found:
        problems.append("file table: no rows")
    return problems


def _quality(lines: list[str], manifest: Manifest) -> list[str]:
    """The quality table: one row per file the card lists, every figure the manifest's."""
    found = _table(lines, QUALITY_COLUMNS)
    listed = _table(lines, COLUMNS) or []
    artifacts = [a for a in manifest.artifacts if any(p in {row[0] for row in listed} for p, *_ in a.upload_files())]
    want = quality_rows(manifest, artifacts)
    if found is None:
        measured = any((e := manifest.smoke_result(a)) and e.quality for a in artifacts)
        return ["quality table: not found (its header must be the one moeprep writes)"] if measured else []
    problems = []
    if [row[0] for row in found] != [row[0] for row in want]:
        problems.append(f"quality table: lists {', '.join(row[0] for row in found) or 'no file'}, the file table "
                        f"{', '.join(row[0] for row in want) or 'none'}")
    for got_row, want_row in zip(found, want):
        for col, got, exp in zip(QUALITY_COLUMNS, got_row, want_row):
            if got != exp:
                problems.append(f"quality table: {want_row[0]}: {col} is {got!r}, the manifest says {exp!r}")
    return problems
