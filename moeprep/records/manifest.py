"""The manifest: one JSON file per output directory, the record every later stage builds on.

Every record in it is a dataclass; pydantic's TypeAdapter turns the whole tree into the documented
JSON and back, checking types on the way in. It is rewritten atomically after each completed step,
so a killed run leaves the last good state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Annotated, NamedTuple

from pydantic import AfterValidator, TypeAdapter, ValidationError

from moeprep.errors import MoeprepError
from moeprep.files import write_json
from moeprep.names import NAME
from moeprep.records.changelog import ChangeEntry
from moeprep.records.probe import ProbeReport
from moeprep.records.results import FileResult, PlanRecord, SmokeReport

FORMAT = "moeprep.manifest/2"
FORMAT_V1 = "moeprep.manifest/1"  # read and upgraded on load
FILENAME = "manifest.json"
MAX_BYTES = 64 * 2**20  # a manifest of every figure of a 100-file directory is a few MB; anything larger is not one
MAX_PATH = 1024  # characters of a path the manifest names: a shard folder and a file, each a plain name


def _file_in_directory(parts: int):
    """A path the manifest may name: relative, POSIX, `parts` components at most, each a plain name (no `..`, no
    absolute path, nothing hidden), ending in .gguf. Every later stage joins it to the output directory."""
    def check(path: str) -> str:
        p = PurePosixPath(path)
        if (len(path) > MAX_PATH or p.is_absolute() or "\\" in path or not 1 <= len(p.parts) <= parts
                or path != str(p) or not all(NAME.fullmatch(part) and len(part) <= 255 for part in p.parts)
                or p.suffix != ".gguf"):
            raise ValueError(f"{path[:80]!r} is not a GGUF file name inside the directory")
        return path
    return check


def _quant_name(name: str) -> str:
    if not NAME.fullmatch(name) or len(name) > 64:
        raise ValueError(f"{name[:80]!r} is not a quant name")
    return name


FileName = Annotated[str, AfterValidator(_file_in_directory(1))]  # an artifact or the imatrix, beside the manifest
ShardName = Annotated[str, AfterValidator(_file_in_directory(2))]  # QUANT/<name>-0000i-of-0000n.gguf
QuantName = Annotated[str, AfterValidator(_quant_name)]


@dataclass
class SourceFile:
    path: str
    size: int
    sha256: str


@dataclass
class SourceCard:
    """What the source repo's own README says that a card inherits, read from the bytes whose sha256 `files` records
    (when the model was converted): data for the card, never template source."""

    license: str | None = None
    license_link: str | None = None
    pipeline_tag: str | None = None
    language: list[str] = field(default_factory=list)
    description: str = ""  # its first paragraph of prose, at most 500 characters


@dataclass
class Source:
    id: str  # Hub repo id, or the local directory converted
    kind: str  # "hub" or "local"
    revision: str | None = None  # what the user asked for ("main", a tag, a sha)
    commit: str | None = None  # the commit sha it resolved to
    files: list[SourceFile] = field(default_factory=list)
    architecture: str | None = None  # config.json's architectures[0]
    card: SourceCard | None = None  # from its README.md as recorded; None: not read (manifests before format 3)

    def fingerprint(self) -> str:
        """One sha256 naming the exact set of input files, so an F16 records what it was made from."""
        lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(self.files, key=lambda f: f.path))
        return hashlib.sha256(lines.encode()).hexdigest()



class UploadFile(NamedTuple):
    """One file of an artifact as a repo holds it: the whole file, or one shard."""

    path: str
    size: int
    sha256: str
    label: str  # as the card's Files table names it: "Q4_K_M (imatrix) (1/3)"


@dataclass
class ArtifactSettings:
    """What, besides its input, decides an artifact's bytes: a change means it must be made again."""

    outtype: str | None = None  # convert: f16, bf16, f32
    ftype: str | None = None  # quantize: llama.cpp file type name
    imatrix: str | None = None  # sha256 of the importance matrix used, if any
    mix: str | None = None  # the named mix it was made as (moe-q4), if any; its rules are in tensor_types
    tensor_types: list[str] = field(default_factory=list)  # PATTERN=TYPE rules llama.cpp applied, first match wins


@dataclass
class Shard:
    path: ShardName  # relative to the manifest, e.g. Q4_K_M/<name>-00001-of-00003.gguf
    size: int
    sha256: str
    made_from: str | None = None  # sha256 of the artifact it was split from
    max_bytes: int | None = None
    mtime_ns: int | None = None


@dataclass
class Artifact:
    path: FileName  # relative to the manifest
    quant: QuantName  # "F16", "Q4_K_M", ...
    size: int
    sha256: str
    stage: str  # "convert" or "quantize"
    made_from: str  # sha256 of the input: the source fingerprint, or the F16 file
    settings: ArtifactSettings = field(default_factory=ArtifactSettings)
    shards: list[Shard] = field(default_factory=list)  # when split for upload
    probe: ProbeReport | None = None  # `moeprep probe` of this file
    plans: list[PlanRecord] = field(default_factory=list)  # llama.cpp's sizings of it, one per context (plan.py)
    mtime_ns: int | None = None  # the file's modification time when recorded: unchanged size and time, unchanged bytes

    def upload_files(self) -> list[UploadFile]:
        """Every file this artifact is uploaded as: the file, or each of its shards."""
        label = self.quant + (" (imatrix)" if self.settings.imatrix else "")
        if self.settings.tensor_types and not self.settings.mix:  # a plain quant name would hide the rules
            label += " (custom tensor types)"
        if self.shards:
            n = len(self.shards)
            return [UploadFile(s.path, s.size, s.sha256, f"{label} ({i}/{n})") for i, s in enumerate(self.shards, 1)]
        return [UploadFile(self.path, self.size, self.sha256, label)]


@dataclass
class CardRecord:
    """How the card was rendered, so that the lint can render it again from this manifest and compare."""

    repo_id: str | None  # None: a card for local use
    layout: str
    quantized_by: str
    base_model: str | None
    endpoint: str  # the Hub address its links use
    draft: bool = False
    template: str | None = None  # a custom template's path, None: moeprep's own
    template_sha256: str | None = None


@dataclass
class LayerCoverage:
    """How the calibration text reached one layer's experts, from the importance matrix's per-expert counts."""

    block: int
    experts: int
    covered: int  # experts that received at least one calibration token
    tokens_min: int
    tokens_median: float
    tokens_max: int
    missing: list[int] = field(default_factory=list)  # experts that received none: llama.cpp quantizes them blind

    @property
    def complete(self) -> bool:
        return self.covered == self.experts


@dataclass
class ImatrixRecord:
    path: FileName
    sha256: str
    made_from: str  # sha256 of the F16
    text: str  # calibration text, by name
    text_sha256: str
    ctx: int
    chunks: int
    quants: list[str]
    tool: str
    coverage: list[LayerCoverage] | None = None  # None: recorded before moeprep read it; [] for a dense model

    def uncovered(self) -> int:
        return sum(len(layer.missing) for layer in self.coverage or [])


@dataclass
class Manifest:
    model: str
    source: Source
    tools: dict[str, str | bool | None] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    smoke: SmokeReport | None = None
    imatrix: ImatrixRecord | None = None
    card: CardRecord | None = None
    changelog: list[ChangeEntry] = field(default_factory=list)  # what re-validations found, oldest first
    format: str = FORMAT
    updated: str = ""

    def artifact(self, quant: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.quant == quant), None)

    def artifact_at(self, path: str | Path) -> Artifact | None:
        """The artifact recorded for a file name (or a path relative to the manifest)."""
        name = str(path)
        return next((a for a in self.artifacts if a.path == name), None)

    @property
    def base(self) -> Artifact | None:
        """The converted file every quant is made from."""
        return next((a for a in self.artifacts if a.stage == "convert"), None)

    @property
    def probe(self) -> ProbeReport | None:
        """The converted file's probe: the model's architecture facts."""
        return self.base.probe if self.base else None

    def listed(self) -> set[str]:
        """Every file this manifest vouches for, and itself: what no write may replace unless it makes them again."""
        extra = {self.imatrix.path} if self.imatrix else set()
        return {FILENAME} | extra | {a.path for a in self.artifacts} | {s.path for a in self.artifacts for s in a.shards}

    def imatrix_file(self) -> UploadFile | None:
        """The importance matrix as published beside the files made with it, where some were."""
        i = self.imatrix
        if i is None or not any(a.settings.imatrix == i.sha256 for a in self.artifacts):
            return None
        return UploadFile(i.path, -1, i.sha256, "importance matrix")  # its size is not recorded: -1

    def put(self, artifact: Artifact) -> None:
        self.artifacts = [a for a in self.artifacts if a.quant != artifact.quant] + [artifact]

    def chain_problems(self) -> list[str]:
        """Artifacts that do not chain to the current source: the F16 made from these inputs, the quants from it."""
        base = self.base
        if base is None:
            return ["no converted file is recorded"] if self.artifacts else []
        problems = []
        if base.made_from != self.source.fingerprint():
            problems.append(f"{base.path} was made from other inputs than the source the manifest lists")
        for a in self.artifacts:
            if a is not base and (a.stage == "convert" or a.made_from != base.sha256):
                problems.append(f"{a.path} was not made from the current {base.path}")
        return problems

    def remove(self, artifact: Artifact) -> None:
        """Forget an artifact, and any smoke result recorded for its path."""
        self.artifacts = [a for a in self.artifacts if a is not artifact]
        if self.smoke is not None:
            self.smoke.artifacts.pop(artifact.path, None)

    def smoke_result(self, artifact: Artifact) -> FileResult | None:
        """The recorded smoke of exactly these bytes; a result for other bytes counts for nothing."""
        entry = self.smoke.artifacts.get(artifact.path) if self.smoke else None
        return entry if entry is not None and entry.sha256 == artifact.sha256 else None

    def to_dict(self) -> dict:
        return _adapter().dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        if not isinstance(data, dict):
            raise MoeprepError(f"a manifest must be a JSON object, not {type(data).__name__}",
                               "convert again into a fresh directory")
        if data.get("format") == FORMAT_V1:
            data = _upgrade_v1(data)
        if data.get("format") != FORMAT:
            raise MoeprepError(f"unsupported manifest format {data.get('format')!r} (this moeprep reads {FORMAT})",
                               "convert again into a fresh directory")
        try:
            manifest = _adapter().validate_python(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            why = first["msg"].removeprefix("Value error, ")[:200]
            raise MoeprepError(f"not a valid moeprep manifest: {where}: {why}",
                               "convert again into a fresh directory") from e
        for a in manifest.artifacts:
            if stray := [s.path for s in a.shards if not s.path.startswith(f"{a.quant}/")]:
                raise MoeprepError(f"not a valid moeprep manifest: {a.path}'s shard {stray[0]!r} is outside its "
                                   f"folder {a.quant}/", "convert again into a fresh directory")
        return manifest


@cache
def _adapter():
    return TypeAdapter(Manifest)


def _upgrade_v1(data: dict) -> dict:
    """Format 1 kept one probe for the whole directory and named two keys `from`."""
    data = json.loads(json.dumps(data))
    probe = data.pop("probe", None)
    for a in data.get("artifacts", []):
        if a.get("stage") == "convert" and probe:
            a["probe"] = probe
        for s in a.get("shards", []):
            s["made_from"] = s.pop("from", None)
    smoke = data.get("smoke") or {}
    if "settings" in smoke:  # format 1 measured with llama-cpp-python's defaults; say so, do not claim today's
        s = smoke["settings"]
        s.setdefault("flash_attn", "off")
        s.setdefault("n_batch", min(512, s.get("ctx") or 512))
        s.setdefault("n_ubatch", 512)
    for result in (smoke.get("artifacts") or {}).values():
        for placement in (result.get("placements") or {}).values():
            for b in placement.get("buffers", []):
                b["source"] = b.pop("from", "")
    imatrix = data.get("imatrix")
    if imatrix is not None and "made_from" not in imatrix:
        data["imatrix"] = None  # format 1 could not say which F16 it came from: make it again
    data["format"] = FORMAT
    return data


def path_in(directory: Path) -> Path:
    return Path(directory) / FILENAME


def load(directory: Path) -> Manifest:
    path = path_in(directory)
    if path.is_symlink():  # one planted here would make every later save write through it
        raise MoeprepError(f"{path} is a symbolic link, which moeprep did not make", "remove it, or use another directory")
    return read(path)


def read(path: Path) -> Manifest:
    """A manifest file, read with its size bounded and every record checked (the Hub's cache may link to it)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise MoeprepError(f"{path} is not a plain file", "give an output directory of `moeprep convert`")
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise MoeprepError(f"no manifest at {path}", "run `moeprep convert` into that directory first") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise MoeprepError(f"cannot read {path} ({e.strerror})", "give an output directory of `moeprep convert`") from None
    if len(data) > MAX_BYTES:
        raise MoeprepError(f"{path} is larger than {MAX_BYTES // 2**20} MiB, so it is not a moeprep manifest",
                           "convert again into a fresh directory")
    try:
        return Manifest.from_dict(json.loads(data.decode("utf-8")))
    except UnicodeDecodeError:
        raise MoeprepError(f"{path} is not UTF-8 text, so it is not a moeprep manifest",
                           "convert again into a fresh directory") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise MoeprepError(f"{path} is not valid JSON ({str(e)[:120]})", "convert again into a fresh directory") from None
    except MoeprepError as e:
        raise MoeprepError(f"{path}: {e.message}", e.hint) from e


def load_or_none(directory: Path) -> Manifest | None:
    return load(directory) if path_in(directory).is_file() else None


def save(directory: Path, manifest: Manifest) -> None:
    """Write the manifest, unless nothing but the timestamp would change (a rerun with no work leaves it be)."""
    path = path_in(directory)
    data = manifest.to_dict()
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if isinstance(old, dict) and {**old, "updated": ""} == {**data, "updated": ""}:
            return
    manifest.updated = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(path, {**data, "updated": manifest.updated})
