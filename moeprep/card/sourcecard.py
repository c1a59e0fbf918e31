"""What the source repo's README says that a card inherits: license, pipeline tag, languages, a description.

It is read once, when the model is converted, from the very bytes whose sha256 the manifest records, and kept
in the manifest (`Source.card`); the card never reads the README again. Text from a model repo is data: it is
parsed as YAML without aliases, bounded, and only strings and lists of strings are kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from moeprep.errors import IntegrityError, MoeprepError
from moeprep.hub.repo import cached
from moeprep.inputs import load_yaml
from moeprep.limits import MAX_CONFIG
from moeprep.records.manifest import Source, SourceCard

README = "README.md"


def parse(text: str) -> SourceCard:
    """The inherited fields of a README: its front matter's license, license_link, pipeline_tag and language, and
    its first paragraph of prose."""
    meta: object = {}
    body = text
    if text.startswith("---"):
        parts = text.split("\n---", 2)
        if len(parts) >= 2:
            try:
                meta = load_yaml(parts[0].removeprefix("---")) or {}
            except yaml.YAMLError:
                meta = {}
            body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    meta = meta if isinstance(meta, dict) else {}
    paragraphs = [p.strip() for p in body.split("\n\n")
                  if p.strip() and not p.strip().startswith(("#", "|", "!", "<", "```"))]

    def text_of(key: str) -> str | None:
        value = meta.get(key)
        return str(value)[:200] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None

    languages = meta.get("language")
    languages = [languages] if isinstance(languages, str) else languages if isinstance(languages, list) else []
    return SourceCard(license=text_of("license"), license_link=text_of("license_link"),
                      pipeline_tag=text_of("pipeline_tag"),
                      language=[str(x)[:20] for x in languages if isinstance(x, str)][:50],
                      description=paragraphs[0][:500] if paragraphs else "")


def read(folder: Path, source: Source) -> SourceCard | None:
    """The README in `folder` (the model converted now), checked against the sha256 `source` records for it."""
    entry = next((f for f in source.files if f.path == README), None)
    if entry is None:
        return None
    data = _bytes(Path(folder) / README)
    if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise IntegrityError(f"{Path(folder) / README} is not the README whose sha256 the manifest records",
                             "convert again, so the card inherits from the README that was converted")
    return parse(data.decode("utf-8", errors="replace"))


def of(source: Source) -> SourceCard:
    """The source's card as the manifest records it; for a manifest made before moeprep kept it, the README from
    the local folder or the Hub's cache, used only if its sha256 is the recorded one."""
    if source.card is not None:
        return source.card
    entry = next((f for f in source.files if f.path == README), None)
    if entry is None:
        return SourceCard()
    if source.kind == "local":
        path: Path | None = Path(source.id) / README
    else:
        path = cached(source.id, README, source.commit)
    data = _bytes(path) if path else None
    if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise MoeprepError(f"the source's README.md as recorded (sha256 {entry.sha256[:12]}…) is not available to read "
                           "its license from", "convert again: the manifest then keeps what the card needs")
    return parse(data.decode("utf-8", errors="replace"))


def _bytes(path: Path) -> bytes | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG:
            return None
        return path.read_bytes()
    except OSError:
        return None
