"""The demo: the whole job, run as a release runs it but kept local, on the tiny model of demo/model.py trained
briefly on the calibration text (demo/train.py), so that its generated text and quality figures mean something."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moeprep import quants
from moeprep.demo.train import RECORD, replace_folder, trained
from moeprep.lock import locked
from moeprep.predict.plan import Plan
from moeprep.records import manifest as mf
from moeprep.records.manifest import Manifest
from moeprep.records.outcome import Outcome, Stage
from moeprep.records.results import SmokeSettings
from moeprep.release import pipeline
from moeprep.release.pipeline import Job, LocalStore
from moeprep.stages.plan import plan_file


@dataclass
class DemoRun:
    out: Path
    convert: Outcome
    smoke: Outcome
    plan: Plan
    card: Outcome
    manifest: Manifest  # as the job left it, smoke results included


def run(kind: str, out: Path, *, runs: int = 3, status=lambda line: None) -> DemoRun:
    """Train the checkpoint (or take it from the cache), then convert, quantize, probe, smoke, plan and write
    the card (a local draft)."""
    folder = Path(out) / f"tiny-{kind}-GGUF"
    with locked(folder, "demo"):
        source = checkpoint(kind, out, status)
        plan = quants.plan(source.name)
        # 8 chunks of 512 (2,040 scored tokens) of the evaluation text: the whole text would add minutes
        job = Job(str(source), folder, plan, LocalStore(), status=status,
                  smoke=SmokeSettings(runs=runs, quality_ctx=512, quality_chunks=8, sweep=True))
        done = pipeline.run(job, [*pipeline.PREPARE, Stage.SMOKE, Stage.CARD])
        q4 = plan_file(folder / quants.artifact_name(source.name, "Q4_K_M"))
    converted = pipeline.merged({s: o for s, o in done.items() if s in pipeline.PREPARE}, mf.load(folder))
    return DemoRun(folder, converted, done[Stage.SMOKE], q4, done[Stage.CARD], mf.load(folder))


def checkpoint(kind: str, out: Path, status=lambda line: None) -> Path:
    """The demo's trained checkpoint, copied from the cache to `out/tiny-<kind>` unless that copy is current."""
    model = trained(kind, status=status)
    source = Path(out) / f"tiny-{kind}"
    if model.key != _trained_key(source):
        status(f"copying the trained tiny {kind} from {model.path} to {source}")
        replace_folder(model.path, source)
    return source


def _trained_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


