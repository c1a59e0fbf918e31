"""The manifest: one JSON file per output directory, the record every later stage builds on.

It is rewritten atomically after each completed step, so a killed run leaves the last good state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from .errors import MoeprepError
from .files import write_json

FORMAT = "moeprep.manifest/1"
FILENAME = "manifest.json"


@dataclass
class SourceFile:
    path: str
    size: int
    sha256: str


@dataclass
class Source:
    id: str  # Hub repo id, or the local directory converted
    kind: str  # "hub" or "local"
    revision: str | None = None  # what the user asked for ("main", a tag, a sha)
    commit: str | None = None  # the commit sha it resolved to
    files: list[SourceFile] = field(default_factory=list)
    architecture: str | None = None  # config.json's architectures[0]


@dataclass
class Artifact:
    path: str  # relative to the manifest
    quant: str  # "F16", "Q4_K_M", ...
    size: int
    sha256: str
    stage: str  # "convert" or "quantize"
    made_from: str  # sha256 of the input: the source fingerprint, or the F16 file
    settings: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)  # [{path, size, sha256}] when split for upload


@dataclass
class Manifest:
    model: str
    source: Source
    tools: dict = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    probe: dict | None = None
    smoke: dict | None = None  # `moeprep smoke`'s report: hardware, versions, settings, per-artifact results
    imatrix: dict | None = None  # the importance matrix: file, sha256, calibration text and its sha256
    format: str = FORMAT
    updated: str = ""

    def artifact(self, quant: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.quant == quant), None)

    def put(self, artifact: Artifact) -> None:
        self.artifacts = [a for a in self.artifacts if a.quant != artifact.quant] + [artifact]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        if data.get("format") != FORMAT:
            raise MoeprepError(
                f"unsupported manifest format {data.get('format')!r} (this moeprep reads {FORMAT})",
                "convert again into a fresh directory",
            )
        src = data["source"]
        known = {f.name for f in fields(Artifact)}
        return cls(
            model=data["model"],
            source=Source(**{**src, "files": [SourceFile(**f) for f in src.get("files", [])]}),
            tools=data.get("tools", {}),
            artifacts=[Artifact(**{k: v for k, v in a.items() if k in known}) for a in data.get("artifacts", [])],
            probe=data.get("probe"),
            smoke=data.get("smoke"),
            imatrix=data.get("imatrix"),
            updated=data.get("updated", ""),
        )


def path_in(directory: Path) -> Path:
    return Path(directory) / FILENAME


def load(directory: Path) -> Manifest:
    path = path_in(directory)
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise MoeprepError(f"no manifest at {path}", "run `moeprep convert` into that directory first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MoeprepError(f"{path} is not a valid moeprep manifest ({e})", "convert again into a fresh directory") from e


def load_or_none(directory: Path) -> Manifest | None:
    return load(directory) if path_in(directory).exists() else None


def save(directory: Path, manifest: Manifest) -> None:
    """Write the manifest, unless nothing but the timestamp would change (a rerun with no work leaves it be)."""
    path = path_in(directory)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = None
        if old is not None and {**old, "updated": ""} == {**manifest.to_dict(), "updated": ""}:
            return
    manifest.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(path, manifest.to_dict())


def source_fingerprint(files: list[SourceFile]) -> str:
    """One sha256 naming the exact set of input files, so an F16 records what it was made from."""
    import hashlib

    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()
