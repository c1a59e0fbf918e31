"""What the source repo's README says that a card inherits: license, pipeline tag, languages, a description.

It is read once, when the model is converted, from the very bytes whose sha256 the manifest records, and kept
in the manifest (`Source.card`); the card never reads the README again. Text from a model repo is data: it is
parsed as YAML without aliases, bounded, and only strings and lists of strings are kept.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from moeprep.errors import IntegrityError, MoeprepError
from moeprep.hub.repo import cached
from moeprep.inputs import load_yaml
from moeprep.limits import MAX_CONFIG
from moeprep.records.manifest import Source, SourceCard

README = "README.md"
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")
_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$&'*+,;=%-]{1,300}")  # no spaces, brackets or parentheses
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_TAG = re.compile(r"</?[A-Za-z][^>]*>")


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

    def token(key: str) -> str | None:  # a Hub metadata id (license, pipeline tag): one plain token or nothing
        value = meta.get(key)
        return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None

    link = meta.get("license_link")
    languages = meta.get("language")
    languages = [languages] if isinstance(languages, str) else languages if isinstance(languages, list) else []
    return SourceCard(license=token("license"),
                      license_link=link if isinstance(link, str) and _URL.fullmatch(link) else None,
                      pipeline_tag=token("pipeline_tag"),
                      language=[x for x in languages if isinstance(x, str) and _LANGUAGE.fullmatch(x)][:50],
                      description=plain_text(paragraphs[0])[:500] if paragraphs else "")


def plain_text(markdown: str) -> str:
    """A README paragraph as the words a reader sees, and nothing that renders: no HTML or comments, links as their
    text, images dropped, Markdown's active characters escaped. Text from a model repo is data."""
    text = _COMMENT.sub("", markdown)
    text = _IMAGE.sub("", text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = " ".join(text.split())
    return re.sub(r"([\\`\[\]<>#])", r"\\\1", text)


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
