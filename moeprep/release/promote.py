"""Publish from the staging branch: merge every smoke job's result and the quality record into the
manifest, render the card, and promote staging to main in one commit.

The card is a function of the manifest alone (prepare recorded each file's plan where the file was), so
publish downloads no GGUF and no header: its directory holds the manifest, the card and the plot.

Promotion copies each GGUF from the staging commit (`CommitOperationCopy`): the Hub references the LFS
object it already holds by sha256, and no byte is uploaded again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from moeprep.card.lint import lint
from moeprep.card.render import PLOT
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import write_json
from moeprep.hub.repo import HubRepo, Want, plan_commit, token_check
from moeprep.records import manifest as mf
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.records.results import SmokeReport
from moeprep.release.recipe import Recipe
from moeprep.release.staging import (
    Staged,
    check_layout,
    current_result,
    read,
    same_manifest,
    smoke_settings,
    smoked_labels,
)
from moeprep.shell import hint
from moeprep.stages import card as card_stage
from moeprep.stages import quality as kld


def merge(staged: Staged, r: Recipe) -> mf.Manifest:
    """The staged manifest with every quant's smoke result and its quality, as one SmokeReport.

    The card states one machine for all figures, so results from different machines are refused.
    """
    m, q = staged.manifest, staged.quality
    where = f"{staged.repo_id}@{staged.branch}"
    if m is None:
        raise MoeprepError(f"{where} holds no manifest", f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')}")
    settings = smoke_settings(r)
    labels = smoked_labels(r)
    if missing := [x for x in labels if current_result(staged, x, settings) is None]:
        raise MoeprepError(f"{where} has no current smoke result for {', '.join(missing)}",
                           f"run {hint('moeprep', 'release', r.path, '--stages', 'smoke', '--quant', missing[0])}")
    reports = [staged.smoke[x] for x in labels]
    machines = {rep.machine() for rep in reports}
    if len(machines) > 1:
        by = ", ".join(f"{x}: {rep.hardware.cpu}" + "".join(f" + {g.name}" for g in rep.hardware.gpus)
                       for x, rep in zip(labels, reports, strict=True))
        raise MoeprepError(f"{where}: the smoke results were measured on different machines ({by}); one card states one",
                           "give the smoke jobs one kind of runner (a runs-on label) and run them again")
    if q is None:
        raise MoeprepError(f"{where} has no {kld.FILENAME}", f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} again")
    latest = max(reports, key=lambda rep: rep.measured_at)
    merged = SmokeReport(measured_at=latest.measured_at, backend=latest.backend, nvml=latest.nvml,
                         hardware=latest.hardware, tools=latest.tools, settings=latest.settings,
                         methods={**latest.methods, "kld": q.method})
    for label, rep in zip(labels, reports, strict=True):
        a = m.artifact(label)
        if a is None:
            raise MoeprepError(f"{where}: the manifest lists no {label}",
                               f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} again")
        result = rep.artifacts[a.path]
        entry = q.current(a)
        if entry is None:
            raise MoeprepError(f"{where}: {kld.FILENAME} has no quality of {a.path} as staged",
                               f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} again")
        result.quality = entry.quality
        first = next(iter(result.placements.values()), None)
        if first is not None and kld.collapses(q, first.greedy_tokens):
            raise MoeprepError(f"{a.path} fails: its {first.placement} output collapses into one repeated token where "
                               f"the F16's does not", "nothing was promoted; look at the quant before releasing it")
        merged.artifacts[a.path] = result
    m.smoke = merged
    return m


def publish_card(out: Path, r: Recipe, *, status: Status = quiet) -> tuple[Outcome, Staged]:
    """Merge the staged results into the manifest in `out` and render the card there; nothing is uploaded. The card
    needs no GGUF: every figure it shows, the plans too, is in the manifest prepare staged."""
    check_layout(r)
    out = Path(out)
    staged = read(r, results=True)
    if staged is None or staged.manifest is None:
        raise MoeprepError(f"{r.hub.repo_id}@{r.hub.staging} holds nothing to publish",
                           f"run {hint('moeprep', 'release', r.path, '--stages', 'prepare')} first")
    m = merge(staged, r)
    options = r.card_options()
    options.files_here = False  # the files are on the staging branch, each checked against the manifest there
    m.card = card_stage.card_record(m, options)  # as the card stage will record it: a rerun compares equal
    data = m.to_dict()
    main_repo = HubRepo(r.hub.repo_id, "main")
    published = main_repo.files()
    main = main_repo.read_json(mf.FILENAME) if mf.FILENAME in published else None
    main = main if isinstance(main, dict) else None
    unchanged = main is not None and same_manifest(main, data)
    data["updated"] = main["updated"] if main is not None and unchanged else datetime.now(UTC).isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    write_json(mf.path_in(out), data, root=out)
    outcome = card_stage.write(out, options, status=status)

    # the card is work only where it differs from main's
    _, same = plan_commit([Want(n, local=(out / n).read_bytes()) for n in outcome.made], published)
    outcome.made = [n for n in outcome.made if n not in same]
    outcome.kept += same
    return outcome, staged


def promote(out: Path, r: Recipe, staged: Staged | None = None, *, status: Status = quiet) -> Outcome:
    """One commit on main: each GGUF copied from the staging commit by reference, plus card, plot and manifest.

    The card is linted against the manifest, and every file the manifest lists must be on the staging
    commit with its sha256, before anything is committed. With nothing changed, no commit is made.
    """
    check_layout(r)
    out = Path(out)
    staged = staged or read(r)
    if staged is None:
        raise MoeprepError(f"{r.hub.repo_id}@{r.hub.staging} does not exist", f"run {hint('moeprep', 'release', r.path)} first")
    m = mf.load(out)
    card = out / "README.md"
    if not card.is_file():
        raise MoeprepError(f"{card} does not exist", f"run {hint('moeprep', 'release', r.path, '--stages', 'publish')}")
    if problems := lint(card, m, check_files=False):
        raise MoeprepError(f"card lint failed for {card} ({len(problems)} problems; first: {problems[0]})",
                           "nothing was promoted")
    imatrix = m.imatrix_file()
    files = [f for a in m.artifacts for f in a.upload_files()] + ([imatrix] if imatrix else [])
    for f in files:
        if not staged.holds(f.path, f.sha256):
            raise IntegrityError(f"{staged.repo_id}@{staged.branch} (commit {staged.commit[:12]}) does not hold "
                                 f"{f.path} with the sha256 the manifest lists", "run the release's prepare job again")
    token_check()
    main = HubRepo(r.hub.repo_id, "main")
    wanted = [Want(f.path, f.sha256, copy_from=staged.commit) for f in files]
    wanted += [Want(name, local=(out / name).read_bytes()) for name in ("README.md", PLOT, mf.FILENAME)
               if (out / name).is_file()]
    todo, kept = plan_commit(wanted, main.files())
    outcome: Outcome[None] = Outcome(Stage.PROMOTE, kept=kept)
    if todo:
        status(f"{r.hub.repo_id}: promoting {r.hub.staging}@{staged.commit[:12]} to main in one commit")
        sha = main.commit(todo, f"moeprep: {m.model} GGUF ({', '.join(a.quant for a in m.artifacts)}) "
                                f"from {r.hub.staging}@{staged.commit[:12]}")
        outcome.made = [w.path_in_repo for w in todo]
        outcome.notes.append(f"{main.url()} is now at commit {sha}")
    return outcome
