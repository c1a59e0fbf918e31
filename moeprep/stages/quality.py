"""Quality stage: every quant's KL divergence against the F16, measured where both files already are.

A release computes quality in `prepare`, not in the GPU smoke jobs, for two reasons:

- Bytes. The KLD needs the F16's logits. A smoke job that computed it would download the F16 beside the
  quant it measures: for Mixtral-8x7B, 93 GB more per job, on every GPU runner of the matrix. `prepare`
  has just written the F16 and every quant on its own disk.
- Comparability. KL divergence is a property of the quant's bytes. Computing the reference and the quant
  on one backend in one process keeps backend differences (CPU against CUDA kernels) out of the figure,
  which matters at Q8_0's 1e-5 scale, and keeps the figure the same whichever GPU a smoke job lands on.

What it costs: one llama.cpp eval of the evaluation text per file on the prepare runner's CPU (the F16
once, then each quant), and the F16's short greedy generation. The results go to `quality.json` beside
the manifest, keyed by file and sha256, so a rerun measures only new bytes; publish copies them into the
manifest's smoke results, and checks there each quant's greedy output from its GPU smoke against the
F16's for collapse. It calls smoke's own reference and quality functions, so the figures mean exactly
what `moeprep smoke` reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from moeprep import hardware as gpu
from moeprep.errors import MoeprepError
from moeprep.files import write_json
from moeprep.llama.build import backends, devices
from moeprep.quality import scoring as quality
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import Hardware, Quality, SmokeSettings
from moeprep.stages import measure as measuring
from moeprep.tools import versions

FILENAME = "quality.json"
FORMAT = "moeprep.quality/1"


@dataclass
class Entry:
    sha256: str  # of the quant measured
    quality: Quality
    failures: list[str] = field(default_factory=list)


@dataclass
class QualityRecord:
    """The prepare job's quality measurements: against which reference, how, on what machine."""

    reference: str
    reference_sha256: str
    reference_greedy: list[int]
    settings: SmokeSettings
    backend: str
    hardware: Hardware
    tools: dict[str, str | bool | None]
    measured_at: str
    method: str
    results: dict[str, Entry] = field(default_factory=dict)  # file name -> entry
    format: str = FORMAT

    def current(self, artifact: mf.Artifact) -> Entry | None:
        e = self.results.get(artifact.path)
        return e if e is not None and e.sha256 == artifact.sha256 else None

    def to_dict(self) -> dict:
        return _adapter().dump_python(self, mode="json")


@cache
def _adapter():
    return TypeAdapter(QualityRecord)


def parse(data: object, where: str) -> QualityRecord:
    try:
        return _adapter().validate_python(data)
    except ValidationError as e:
        raise MoeprepError(f"{where} is not a moeprep quality record ({e.errors()[0]['msg']})",
                           "run the release's prepare stages again") from e


def load(out: Path) -> QualityRecord | None:
    path = Path(out) / FILENAME
    if not path.is_file():
        return None
    return parse(json.loads(path.read_text(encoding="utf-8")), str(path))


def measure(out: Path, settings: SmokeSettings, *, status: Status = quiet) -> Outcome:
    """KLD and top-1 of every quant in `out` against its F16, kept where these bytes were measured already.

    Raises when a quant's logits are not finite or its greedy output collapses where the F16's does not:
    such a file is never staged. The outcome's result is the QualityRecord.
    """
    out = Path(out)
    m = mf.load(out)
    base = m.base
    if base is None:
        raise MoeprepError(f"the manifest in {out} has no converted file to compare with", "run the prepare stages")
    settings, text = measuring.resolved(settings)
    record = load(out)
    if record is not None and (record.reference_sha256 != base.sha256 or record.settings.quality_key() != settings.quality_key()):
        record = None  # another F16 or another method: nothing recorded counts
    quants = [a for a in m.artifacts if a is not base]
    outcome: Outcome[QualityRecord] = Outcome(Stage.QUALITY)
    todo = [a for a in quants if record is None or record.current(a) is None]
    outcome.kept = [a.path for a in quants if a not in todo]
    if todo:
        status(f"quality: the reference of {base.path}")
        ref = measuring.reference_for(out / base.path, base.sha256, settings, text)
        if record is None:
            record = QualityRecord(
                reference=base.path, reference_sha256=base.sha256, reference_greedy=ref.greedy_tokens,
                settings=settings, backend="+".join(backends([d for d in devices() if d["type"] != "CPU"]) or ["CPU"]),
                hardware=gpu.hardware(None), tools=versions(),
                measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
                method=(f"{quality.METHODS['kld']}; the F16 and the file evaluated on the same machine and backend "
                        f"in the release's prepare job"))
        for a in todo:
            status(f"quality: {a.path} against {base.path}")
            q = measuring.quality_of(out / a.path, ref, settings)
            record.results[a.path] = Entry(a.sha256, q, [] if q.finite else ["NaN or inf in the logits"])
            write_json(out / FILENAME, record.to_dict())  # after each file: a rerun keeps what was measured
            outcome.made.append(a.path)
    if record is not None:
        if stale := [p for p in record.results if m.artifact_at(p) is None]:
            for p in stale:
                del record.results[p]
            write_json(out / FILENAME, record.to_dict())
        if failed := {p: e.failures for p, e in record.results.items() if e.failures}:
            name, reasons = next(iter(failed.items()))
            raise MoeprepError(f"quality failed for {', '.join(failed)}: {reasons[0]}", f"see {out / FILENAME}")
    outcome.result = record
    return outcome


def collapses(record: QualityRecord, greedy_tokens: list[int]) -> bool:
    """A file's greedy output (from its smoke) collapses into one repeated token where the F16's does not."""
    return quality.degenerates_alone(greedy_tokens, record.reference_greedy)
