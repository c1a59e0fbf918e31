"""Re-validation: a published repo's files smoked again with the llama.cpp build at hand, and compared with the
figures its card publishes. Unchanged within the recorded spread, nothing is committed. Changed, the card is
rendered again with the new figures and a dated changelog entry naming both llama.cpp builds and every figure
that moved, the old value beside the new, and committed with a message that says why. Never a silent rewrite.

Speed is compared only on the kind of machine that measured it; a move counts when it leaves both the recorded
spread and a floor for run-to-run noise (MIN_SPEED_CHANGE). A placement that passed and now fails counts, and a
mean KLD that moved beyond three standard errors (and QUALITY_FLOOR) counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from moeprep.card.render import PLOT
from moeprep.errors import MoeprepError
from moeprep.hub.repo import HubRepo, Want, plan_commit, token_check
from moeprep.records import manifest as mf
from moeprep.records.changelog import Change, ChangeEntry
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import FileResult, SmokeReport, Statistic
from moeprep.stages import card as card_stage
from moeprep.stages import smoke as smoke_stage
from moeprep.stages.pull import parse, pull

MIN_SPEED_CHANGE = 0.20  # relative, by default: a CPU or a shared GPU varies this much between runs of one build
QUALITY_FLOOR = 1e-4  # mean KLD: below this, two builds' logits differ by rounding only


@dataclass
class Revalidation:
    repo_id: str
    llama_cpp_before: str | None
    llama_cpp_after: str | None
    changes: list[Change] = field(default_factory=list)
    commit: str | None = None  # the commit made, where something moved

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def revalidate(spec: str, out: Path, *, quality: bool = True, dry_run: bool = False,
               speed_tolerance: float = MIN_SPEED_CHANGE, status: Status = quiet) -> Outcome[Revalidation]:
    """Pull `spec` (ORG/NAME), smoke every file its manifest's smoke measured with the recorded settings, compare,
    and commit a new card and manifest where a figure moved (not with `dry_run`)."""
    repo_id, revision = parse(spec)
    out = Path(out)
    if not dry_run:
        token_check()
    published = pull(spec, out, quants=None, status=status).result
    assert published is not None
    old = published.smoke
    if old is None:
        raise MoeprepError(f"{spec} publishes no smoke results to compare with", "release it with moeprep first")
    settings = replace(old.settings, threads=None)  # one thread per physical core of this machine, as llama-server
    measured = smoke_stage.run(out, settings, quality=quality and any(r.quality for r in old.artifacts.values()),
                               status=status).result
    assert measured is not None
    if measured.machine() != old.machine():
        raise MoeprepError(f"{spec} was measured on {_machine(old)}; this machine is {_machine(measured)}",
                           "re-validate on the kind of machine that measured the published figures")
    before, after = old.tools.get("llama_cpp_commit"), measured.tools.get("llama_cpp_commit")
    result = Revalidation(repo_id, str(before) if before else None, str(after) if after else None)
    for name, was in old.artifacts.items():
        now = measured.artifacts.get(name)
        result.changes += compare(name, was, now, quality, speed_tolerance)
    outcome: Outcome[Revalidation] = Outcome(Stage.REVALIDATE, result=result)
    if not result.changed:
        outcome.notes.append(f"{repo_id}: every figure is within its recorded spread with llama.cpp {after}; "
                             "nothing committed")
        return outcome
    m = mf.load(out)
    m.changelog.append(ChangeEntry(datetime.now(UTC).date().isoformat(), result.llama_cpp_before,
                                   result.llama_cpp_after, result.changes))
    mf.save(out, m)
    if m.card is None:
        raise MoeprepError(f"{spec}'s manifest records no card", "publish it with moeprep first")
    options = card_stage.CardOptions(repo_id=m.card.repo_id, layout=m.card.layout, quantized_by=m.card.quantized_by,
                                     base_model=m.card.base_model, draft=m.card.draft, files_here=True)
    card = card_stage.write(out, options, status=status)
    wanted = [Want(name, local=(out / name).read_bytes()) for name in ("README.md", mf.FILENAME, PLOT)
              if (out / name).is_file()]
    repo = HubRepo(repo_id, revision)
    todo, _ = plan_commit(wanted, repo.files())
    outcome.made = card.made + [w.path_in_repo for w in todo if w.path_in_repo not in card.made]
    if dry_run or not todo:
        return outcome
    moved = ", ".join(sorted({f"{c.file} {c.what}" for c in result.changes})[:4])
    status(f"{repo_id}: committing the re-validated card ({len(result.changes)} figures moved)")
    result.commit = repo.commit(todo, f"moeprep revalidate: llama.cpp {before} -> {after}: {len(result.changes)} "
                                      f"figures moved ({moved}{' …' if len(result.changes) > 4 else ''})")
    return outcome


def compare(name: str, was: FileResult, now: FileResult | None, quality: bool,
            speed_tolerance: float = MIN_SPEED_CHANGE) -> list[Change]:
    """Every figure of one file that moved beyond its spread, and every placement that no longer passes."""
    if now is None:
        return [Change(name, "smoke", "measured", "not measured now")]
    changes = []
    for placement, old in was.placements.items():
        new = now.placements.get(placement)
        if new is None or (not old.failures and new.failures):
            why = "; ".join(new.failures) if new is not None and new.failures else "did not run"
            changes.append(Change(name, str(placement), "passed", f"fails: {why}"))
            continue
        if _moved(old.decode_tps, new.decode_tps, speed_tolerance):
            changes.append(Change(name, f"{placement} decode tok/s", old.decode_tps.text(1, True),
                                  new.decode_tps.text(1, True)))
    if quality and was.quality and now.quality and (before := was.quality.kld_mean) is not None:
        after = now.quality.kld_mean
        spread = 3 * max(was.quality.kld_se or 0.0, now.quality.kld_se or 0.0)
        if after is None or abs(after - before) > max(spread, QUALITY_FLOOR):
            changes.append(Change(name, "mean KLD", f"{before:.6f}", f"{after:.6f}" if after is not None else "not finite"))
    return changes


def _moved(old: Statistic, new: Statistic, tolerance: float) -> bool:
    if old.mean is None or new.mean is None:
        return (old.mean is None) != (new.mean is None)
    band = max(3 * (old.sd or 0.0), 3 * (new.sd or 0.0), tolerance * abs(old.mean))
    return not math.isclose(old.mean, new.mean, abs_tol=band)


def _machine(report: SmokeReport) -> str:
    hw = report.hardware
    return f"{report.backend}, {hw.cpu}" + "".join(f" + {g.name}" for g in hw.gpus)
