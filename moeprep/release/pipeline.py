"""The one composition of the stages. `moeprep convert`, `moeprep demo` and `moeprep release` all run this list,
in this order, each the stages it needs; only where results go differs, and that is the store's:

- `LocalStore` keeps everything in the output directory: the smoke measures quality along with speed, the card is
  a local one, nothing is staged or promoted (convert, demo);
- `StagingStore` is a recipe's Hub repo: quality is measured where the GGUFs are made, the files go to the staging
  branch, each smoke job reads one from there, and publish renders the card and promotes staging to main.

Every stage reads what it needs from the `Job` and the output directory, and returns an Outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from moeprep.errors import MoeprepError
from moeprep.files import human_bytes
from moeprep.hub.snapshot import fetch_config, missing, resolve
from moeprep.quants import DEFAULT_QUANTS, ImatrixSpec, QuantPlan
from moeprep.quants import plan as quant_plan
from moeprep.records import manifest as mf
from moeprep.records.manifest import Source
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import SmokeSettings
from moeprep.release import promote, staging
from moeprep.release.recipe import Expect, Recipe
from moeprep.stages import card as card_stage
from moeprep.stages import plan as plan_stage
from moeprep.stages import quality as kld
from moeprep.stages import smoke as smoke_stage
from moeprep.stages import split as split_stage
from moeprep.stages.convert import (
    DENSE,
    check_config,
    check_disk_for_download,
    convert_model,
    default_out,
    model_name,
)
from moeprep.stages.download import check_cache_space, verified
from moeprep.stages.quantize import quantize_model


@dataclass
class Job:
    """What every stage of one run shares: the source, what to make, how to measure and render, and the store."""

    source: str  # a Hub repo id or a local model directory
    out: Path
    plan: QuantPlan
    store: Store
    revision: str | None = None
    nthread: int = 0
    smoke: SmokeSettings = field(default_factory=SmokeSettings)
    card: card_stage.CardOptions = field(default_factory=lambda: card_stage.CardOptions(draft=True))
    max_shard: int | None = None  # split files larger than this
    expect: Expect | None = None  # a recipe's facts about the model, checked against the converted file
    source_size: int | None = None  # a recipe's size of the source, checked against the Hub's
    quants: list[str] | None = None  # smoke only these quants (a matrix job's one)
    status: Status = quiet
    fetched: tuple[Path, Source] | None = None  # the download stage's verified folder and Source, for convert


class Store(Protocol):
    """Where a run's measurements and files go. A stage the store has nothing to do for returns None."""

    def quality(self, job: Job) -> Outcome | None: ...
    def stage(self, job: Job) -> Outcome | None: ...
    def smoke(self, job: Job) -> Outcome | None: ...
    def card(self, job: Job) -> Outcome | None: ...
    def promote(self, job: Job) -> Outcome | None: ...


class LocalStore:
    """Everything in the output directory: one smoke measures speed and quality, and the card is rendered there."""

    def quality(self, job: Job) -> None:
        return None  # the smoke measures it, with the F16 loaded once

    def stage(self, job: Job) -> None:
        return None

    def smoke(self, job: Job) -> Outcome:
        outcome = smoke_stage.run(job.out, job.smoke, only_stale=True, status=job.status)
        if outcome.result and (failed := outcome.result.failed()):
            name, reasons = next(iter(failed.items()))
            raise MoeprepError(f"smoke failed for {name}: {reasons[0]}", "the full results are in the manifest")
        return outcome

    def card(self, job: Job) -> Outcome:
        return card_stage.write(job.out, job.card, status=job.status)

    def promote(self, job: Job) -> None:
        return None


@dataclass
class StagingStore:
    """A recipe's Hub repo: its staging branch between CI jobs, then main (release/staging.py, release/promote.py)."""

    recipe: Recipe
    staged: staging.Staged | None = None  # the staging commit the card was rendered from, for promote

    def quality(self, job: Job) -> Outcome:
        return kld.measure(job.out, job.smoke, status=job.status)

    def stage(self, job: Job) -> Outcome:
        return staging.stage(job.out, self.recipe, status=job.status)

    def smoke(self, job: Job) -> Outcome:
        return staging.smoke(job.out, self.recipe, job.quants, status=job.status)

    def card(self, job: Job) -> Outcome:
        outcome, self.staged = promote.publish_card(job.out, self.recipe, status=job.status)
        return outcome

    def promote(self, job: Job) -> Outcome:
        return promote.promote(job.out, self.recipe, self.staged, status=job.status)


def download(job: Job) -> Outcome:
    """A Hub repo resolved to a commit, checked (disk, config) before any weight moves, downloaded and verified."""
    if Path(job.source).is_dir():
        return Outcome(Stage.DOWNLOAD, notes=[])
    job.status(f"resolving {job.source}@{job.revision or 'main'}")
    snap = resolve(job.source, job.revision)
    job.status(f"{job.source}@{snap.revision} is commit {snap.commit}: {len(snap.files)} files")
    check_cache_space(snap)
    check_disk_for_download(snap, job.out, job.plan)
    if not check_config(fetch_config(snap)).is_moe:  # said now, before the download, not only at the end
        job.status(f"note: {DENSE.format(name=job.source)}")
    fetch = {f.path for f in missing(snap)}
    job.fetched = verified(snap)
    notes = [f"{job.source}@{snap.revision} is commit {snap.commit}; every file verified"]
    if job.source_size and abs(snap.size - job.source_size) > 0.05 * job.source_size:
        notes.append(f"the source is {human_bytes(snap.size)}, the recipe says {human_bytes(job.source_size)}: "
                     "`moeprep matrix` sizes the jobs from the recipe, so correct source.size")
    return Outcome(Stage.DOWNLOAD, made=sorted(fetch), kept=sorted(f.path for f in snap.files if f.path not in fetch),
                   notes=notes)


def convert(job: Job) -> Outcome:
    folder, src = job.fetched if job.fetched else (Path(job.source), None)
    return convert_model(folder, src, job.plan, out=job.out, dense_note=job.fetched is None, status=job.status)


def probe(job: Job) -> Outcome:
    manifest = mf.load(job.out)
    if job.expect is None:
        return Outcome(Stage.PROBE, kept=[manifest.base.path] if manifest.base else [])
    check_expectations(job.expect, manifest, job.source)
    return Outcome(Stage.PROBE, kept=[manifest.base.path] if manifest.base else [], notes=["the converted file matches the recipe's expect section"])


def quantize(job: Job) -> Outcome:
    return quantize_model(job.out, job.plan, nthread=job.nthread, status=job.status)


def plan(job: Job) -> Outcome:
    """Each file's KV cache and compute buffer, sized by llama.cpp where the file is: the card shows them later,
    in a job that may hold no GGUF."""
    manifest = mf.load(job.out)
    made = plan_stage.stage(job.out, manifest, status=job.status)
    return Outcome(Stage.PLAN, made=made, kept=[a.path for a in manifest.artifacts if a.path not in made])


def split(job: Job) -> Outcome:
    if not job.max_shard:
        return Outcome(Stage.SPLIT)
    return split_stage.stage(job.out, job.max_shard, status=job.status)


def _in_store(name: str) -> Callable[[Job], Outcome | None]:
    def run(job: Job) -> Outcome | None:
        return getattr(job.store, name)(job)
    run.__name__ = name
    return run


STAGES: dict[Stage, Callable[[Job], Outcome | None]] = {
    Stage.DOWNLOAD: download, Stage.CONVERT: convert, Stage.PROBE: probe, Stage.QUANTIZE: quantize,
    Stage.PLAN: plan, Stage.QUALITY: _in_store("quality"), Stage.SPLIT: split, Stage.STAGE: _in_store("stage"),
    Stage.SMOKE: _in_store("smoke"), Stage.CARD: _in_store("card"), Stage.PROMOTE: _in_store("promote"),
}
PREPARE = [Stage.DOWNLOAD, Stage.CONVERT, Stage.PROBE, Stage.QUANTIZE, Stage.PLAN]  # what `moeprep convert` runs


def prepare(source: str, *, out: Path | None = None, quants: list[str] | tuple[str, ...] = DEFAULT_QUANTS,
            mixes: list[str] | tuple[str, ...] = (), tensor_types: list[str] | tuple[str, ...] = (),
            outtype: str = "f16", revision: str | None = None, nthread: int = 0, imatrix_text: Path | None = None,
            status: Status = quiet) -> Outcome[mf.Manifest]:
    """`moeprep convert`: download (for a repo id), convert, probe, quantize and plan, into `out`; one Outcome for
    all of it, its result the final manifest. With `imatrix_text`, every quant is made with an importance matrix
    computed from it."""
    name = model_name(source)
    spec = ImatrixSpec(tuple([*quants, *mixes]), imatrix_text) if imatrix_text else None
    plan = quant_plan(name, quants, mixes, tensor_types, outtype=outtype, imatrix=spec)  # checked before any work
    out = Path(out) if out else default_out(name)
    job = Job(source, out, plan, LocalStore(), revision=revision, nthread=nthread, status=status)
    return merged(run(job, PREPARE), mf.load(out))


def run(job: Job, stages: list[Stage], skip: Callable[[Stage], str | None] = lambda s: None) -> dict[Stage, Outcome]:
    """Run `stages` in the list's order; a stage the store has nothing to do for is left out of the result, and
    one `skip` names a reason for is recorded as skipped without running."""
    done: dict[Stage, Outcome] = {}
    for name in STAGES:
        if name not in stages:
            continue
        if (why := skip(name)) is not None:
            done[name] = Outcome(name, notes=[why] if why else [])
            continue
        if (outcome := STAGES[name](job)) is not None:
            done[name] = outcome
    return done


def check_expectations(expect: Expect, manifest: mf.Manifest, where: object) -> None:
    """The recipe's architecture facts against the converted file: a release of the wrong model stops here."""
    probe_report = manifest.probe
    wrong = []
    if expect.architecture and manifest.source.architecture != expect.architecture:
        wrong.append(f"architecture {manifest.source.architecture} (expected {expect.architecture})")
    for key in ("expert_count", "expert_used_count", "expert_shared_count", "block_count"):
        want = getattr(expect, key)
        if want is not None and getattr(probe_report, key, None) != want:
            wrong.append(f"{key} {getattr(probe_report, key, None)} (expected {want})")
    if wrong:
        raise MoeprepError(f"{where}: the converted file does not match the recipe: {'; '.join(wrong)}",
                           "check the source revision, or correct the recipe's expect section")


def merged(outcomes: dict[Stage, Outcome], result: mf.Manifest | None = None) -> Outcome[mf.Manifest]:
    """Several stages' outcomes as one (what `moeprep convert` reports), its result the final manifest: the GGUFs
    made and kept (not the download's cache, nor the records the plan stage wrote), and every stage's notes."""
    files = [o for stage, o in outcomes.items() if stage in (Stage.CONVERT, Stage.QUANTIZE)]
    made = [f for o in files for f in o.made]
    kept = [f for o in files for f in o.kept if f not in made]
    notes = list(dict.fromkeys(n for o in outcomes.values() for n in o.notes))
    return Outcome(Stage.CONVERT, made, kept, notes, result)
