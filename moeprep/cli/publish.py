"""The commands that publish and schedule: card, push, pull, release, matrix."""

from __future__ import annotations

from pathlib import Path

import click

from moeprep.cli import main, output, writing
from moeprep.cli.options import card_options, json_option
from moeprep.cli.output import emit, status
from moeprep.errors import MoeprepError
from moeprep.lock import locked
from moeprep.records import manifest as mf

GROUPS = ("prepare", "smoke", "publish")  # release/run.py's GROUPS, named here so that `--help` imports nothing heavy
REVALIDATE = "revalidate"  # the monthly re-validation's matrix (release/run.py)


@main.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@card_options
@click.option("--check", "check", type=click.Path(path_type=Path), help="Lint this card file instead of writing one.")
@click.option("--push", "and_push", is_flag=True, help="Then push, as `moeprep push DIR --repo-id ...` does.")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--dry-run", is_flag=True, help="Write nothing; with --push, print what would be uploaded.")
@json_option
def card(directory, repo_id, layout, template, max_shard, quantized_by, base_model, check, and_push, private,
         dry_run, as_json) -> None:
    """Write DIR/README.md from DIR/manifest.json, or lint a card with --check.

    The card is rendered in a Jinja sandbox from the manifest's records and must pass its own
    lint: front matter, merge markers, unrendered template syntax, empty cells, figures equal to
    the manifest's, absolute links to other repos. Files larger than --max-shard are split first,
    so the card lists what will be uploaded. --push then uploads, as `moeprep push` does.

    \b
    Example:
      moeprep card Phi-3.5-MoE-instruct-GGUF --repo-id me/Phi-3.5-MoE-instruct-GGUF --push
    """
    from moeprep.card.lint import lint
    from moeprep.stages import card as card_stage

    if check:
        problems = lint(check)
        emit({"card": check, "problems": problems}, as_json, lambda r: problems or [f"{check}: no problems"])
        if problems:
            raise MoeprepError(f"card lint failed: {len(problems)} problem{'s' * (len(problems) != 1)} in {check}",
                               "fix them, or render the card again")
        return
    if directory is None:
        raise MoeprepError("no output directory given", "moeprep card DIR, or moeprep card --check FILE")
    if and_push and not repo_id:
        raise MoeprepError("--push needs --repo-id ORG/NAME", "name the Hub repo to push to")
    from moeprep.hub.errors import check_repo_id

    for given in (repo_id, base_model):  # both are written into the card: nothing else may ride along
        if given is not None:
            check_repo_id(given)
    from moeprep.stages import plan, split
    from moeprep.units import parse_size

    options = card_stage.CardOptions(repo_id=repo_id, layout=layout, quantized_by=quantized_by, base_model=base_model,
                                     template=template)
    shard = parse_size(max_shard, "shard size")
    with writing(directory, "card", dry_run):
        manifest = mf.load(directory)
        card_stage.check_files(directory, manifest)  # before the plan and the split read them
        plan.stage(directory, manifest, save=not dry_run, status=status)  # a directory made before plans were kept
        split_outcome = split.stage(directory, shard, dry_run=dry_run, status=status)
        written = card_stage.write(directory, options, dry_run=dry_run, status=status)
    output.notes(split_outcome)
    output.notes(written)
    if and_push:
        _push(directory, repo_id, layout, None, private, dry_run, as_json)
        return
    emit({"cards": written.result, "made": written.made, "kept": written.kept}, as_json,
         lambda r: [("would write " if dry_run else "wrote ") + str(p) for p in written.result or []])


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo-id", required=True, help="Hub repo ORG/NAME.")
@click.option("--revision", help="Branch to commit to (created if missing). [default: main]")
@click.option("--layout", type=click.Choice(["single", "per-quant"]), default="single", show_default=True,
              help="The layout the cards were written for.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded, and where; upload nothing.")
@json_option
def push(directory, repo_id, revision, layout, private, dry_run, as_json) -> None:
    """Upload the GGUFs, card, plot and manifest to the Hub: one commit per repo.

    The card must have been written by `moeprep card DIR --repo-id ORG/NAME`; push lints it once
    (figures against the manifest, every file's sha256) and stops if it fails. Files already on
    the Hub with the same sha256 are not sent again. The token (HF_TOKEN or `hf auth login`) is
    never printed.

    \b
    Example:
      moeprep push Phi-3.5-MoE-instruct-GGUF --repo-id me/Phi-3.5-MoE-instruct-GGUF
    """
    _push(directory, repo_id, layout, revision, private, dry_run, as_json)


@main.command()
@click.argument("spec", metavar="ORG/NAME[@REVISION]")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False), help="Where the files go.")
@click.option("--quant", "quants", multiple=True, metavar="QUANT", help="Only this quant; repeat for more. [default: all]")
@json_option
def pull(spec: str, out: Path, quants: tuple[str, ...], as_json: bool) -> None:
    """Fetch a repo's manifest and the GGUFs it lists, checking every sha256 against it.

    For CI jobs that meet through the Hub: a smoke job pulls only the file it measures from the
    staging revision. Files already in --out with the right sha256 are not fetched again.

    \b
    Example:
      moeprep pull me/Phi-3.5-MoE-instruct-GGUF@moeprep-staging --quant Q4_K_M --out work/
    """
    from moeprep.stages.pull import parse
    from moeprep.stages.pull import pull as fetch

    parse(spec)  # a bad repo id is refused before --out is made
    with locked(out, f"pull {spec}"):
        outcome = fetch(spec, out, quants=list(quants), status=status)
    emit({"out": out, "made": outcome.made, "kept": outcome.kept}, as_json,
         lambda r: [f"fetched {p}" for p in outcome.made] + [f"kept {p} (same sha256)" for p in outcome.kept]
         + [f"{len(outcome.made)} fetched, {len(outcome.kept)} already here; manifest: {out / 'manifest.json'}"])


def _push(directory, repo_id, layout, revision, private, dry_run, as_json) -> None:
    from moeprep.stages.push import push as upload

    with writing(directory, f"push {repo_id}", dry_run):
        outcome = upload(directory, repo_id, layout=layout, revision=revision, private=private, dry_run=dry_run,
                         status=status)
    emit(outcome.result, as_json, output.push_lines)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--stages", help="Stages or groups, comma-separated: download,convert,quantize,probe,quality,stage,smoke,"
                               "card,promote; prepare, smoke, publish. [default: all]")
@click.option("--quant", "quants", multiple=True, metavar="QUANT",
              help="With the smoke stage: smoke only this quant (a matrix job's); repeat for more. [default: all]")
@click.option("--out", type=click.Path(path_type=Path), help="Output directory. [default: releases/<name>]")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, files, sizes, disk and RAM preflight); do nothing.")
@json_option
def release(recipe: Path, stages: str | None, quants: tuple[str, ...], out: Path | None, dry_run: bool,
            as_json: bool) -> None:
    """Run a recipe: prepare, smoke and publish, meeting through the repo's staging branch.

    prepare (download, convert, quantize, probe, quality, stage) pushes the GGUFs, manifest and
    quality to the recipe's staging branch; smoke pulls one quant from it, smokes it and adds
    smoke/<quant>.json; publish (card, promote) merges the results, renders the card and promotes
    staging to main in one commit that copies the GGUFs on the Hub. Each group can run on its own
    runner, holding nothing but the recipe. Up to date is skipped: rerun, it continues; with nothing
    changed it does no work and uploads nothing.

    \b
    Example:
      moeprep release recipes/phi-3.5-moe-instruct.yaml --stages smoke --quant Q4_K_M
    """
    from moeprep.release import run as release_stage

    chosen = release_stage.parse_stages(stages)
    if dry_run:
        emit(release_stage.dry_run(recipe, stages=chosen, out=out), as_json, lambda plan: plan.lines())
        return
    report = release_stage.run(recipe, stages=chosen, out=out, quants=list(quants) or None, status=status)
    for outcome in report.stages.values():
        output.notes(outcome)
    emit(report.to_dict(), as_json, lambda r: output.release_lines(report))


@main.command()
@click.argument("spec", metavar="ORG/NAME[@REVISION]")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Where the files are pulled and smoked (a directory of their own).")
@click.option("--no-quality", is_flag=True, help="Compare speed and placements only: do not pull the F16 to measure "
                                                 "KL divergence again.")
@click.option("--speed-tolerance", type=click.FloatRange(0.0, 10.0), default=0.2, show_default=True,
              help="The least relative change of a decode speed that counts, beyond 3 standard deviations.")
@click.option("--dry-run", is_flag=True, help="Measure and compare; commit nothing.")
@json_option
def revalidate(spec: str, out: Path, no_quality: bool, speed_tolerance: float, dry_run: bool, as_json: bool) -> None:
    """Smoke a published repo's files with this llama.cpp and compare with its card.

    Pulls the repo's manifest and files (each sha256 checked), smokes them with the settings the
    manifest records, on the kind of machine that measured them, and compares: a speed outside its
    recorded spread (and --speed-tolerance), a placement that now fails, a mean KLD that moved. Nothing
    moved: nothing is committed. Something moved: a new card with a dated changelog entry naming
    both llama.cpp commits and every figure that moved, in one commit that says why.

    \b
    Example:
      moeprep revalidate me/Phi-3.5-MoE-instruct-GGUF --out work/revalidate
    """
    from moeprep.stages.pull import parse
    from moeprep.stages.revalidate import revalidate as run

    parse(spec)  # a bad repo id is refused before --out is made
    with locked(out, f"revalidate {spec}"):
        outcome = run(spec, out, quality=not no_quality, dry_run=dry_run, speed_tolerance=speed_tolerance,
                      status=status)
    output.notes(outcome)
    result = outcome.result
    assert result is not None  # revalidate always says what it compared
    emit(result, as_json, lambda r: [f"{c.file}: {c.what}: {c.before} -> {c.after}" for c in r.changes]
         + [("changed: " + (f"committed {r.commit}" if r.commit else "nothing committed (dry run)")) if r.changed
            else "unchanged: nothing committed"])


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("recipes"))
@click.option("--group", type=click.Choice([*GROUPS, REVALIDATE]), help="Only this stage group.")
@json_option
def matrix(folder: Path, group: str | None, as_json: bool) -> None:
    """Print the GitHub Actions matrix (JSON) for scheduled releases.

    One prepare and one publish entry per recipe, one smoke entry per recipe x quant, each with
    its runner (runs_on) and estimates from the recipe's source.size: bytes down and up, disk and
    minutes (GPU minutes are not estimated). Always JSON; --json is accepted for symmetry.

    \b
    Example:
      moeprep matrix recipes/ --group smoke
    """
    from moeprep.release import run as release_stage

    emit(release_stage.matrix(folder, group), True, list)
