"""The card stage: check the files against the manifest and that every file's plan is recorded, draw the plot,
record how the card is rendered, render one card per repo (card/render.py) and lint each. It runs no llama.cpp
and splits nothing: the plan and split stages did that where the GGUFs are.

A card that fails its own lint is never left looking finished, and no card is written for files that are not the
bytes the manifest lists.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from moeprep.card.layout import repos
from moeprep.card.lint import lint_text
from moeprep.card.render import PLOT, base_model, render
from moeprep.card.sections import offload_curves
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import matches, write_aside, write_text
from moeprep.hub.repo import endpoint
from moeprep.inputs import read_bytes
from moeprep.limits import MAX_TEMPLATE
from moeprep.records import manifest as mf
from moeprep.records.manifest import CardRecord, Manifest
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.shell import hint

DRAFT = {"front matter: missing base_model", "front matter: missing base_model_relation"}  # what only a draft may lack


@dataclass
class CardOptions:
    repo_id: str | None = None  # None: the card shows local usage only
    layout: str = "single"
    quantized_by: str = "moeprep"
    base_model: str | None = None
    template: Path | None = None
    draft: bool = False  # a card to read locally (the demo's): a local source needs no base model, push refuses it
    files_here: bool = True  # False in a staged release's publish job: the files are on the Hub, not here


def card_record(m: Manifest, options: CardOptions) -> CardRecord:
    template_sha = None
    if options.template:
        data = read_bytes(options.template, MAX_TEMPLATE, "card template", "pass --template PATH to a Jinja template")
        template_sha = hashlib.sha256(data).hexdigest()
    record = CardRecord(options.repo_id, options.layout, options.quantized_by, options.base_model,
                        endpoint(), options.draft,
                        str(Path(options.template).resolve()) if options.template else None, template_sha)
    if not base_model(m, record) and not options.draft:
        raise MoeprepError("the source is a local directory, so the card cannot name its base model",
                           "pass --base-model ORG/NAME")
    return record


def check_files(out: Path, m: Manifest, status: Status = quiet) -> None:
    """Every file the manifest lists is here with the bytes it records, before a card vouches for them."""
    for a in m.artifacts:
        if not matches(out / a.path, a.size, a.sha256, a.mtime_ns):
            what = "missing" if not (out / a.path).is_file() else "not the bytes the manifest records (sha256 differs)"
            raise IntegrityError(f"{out / a.path} is {what}, so no card can vouch for it",
                                 "make it again (`moeprep convert` or `moeprep quantize`), or pull it again")


def write(out: Path, options: CardOptions | None = None, *, dry_run: bool = False,
          status: Status = quiet) -> Outcome[list[Path]]:
    """Check, plot, render and lint; with `dry_run` nothing is written. The result is every card's path."""
    options = options or CardOptions()
    out = Path(out)
    m = mf.load(out)
    if not m.artifacts:
        raise MoeprepError(f"the manifest in {out} lists no artifacts", "run `moeprep convert` first")
    if options.files_here:
        check_files(out, m, status)
    written: list[Path] = []
    outcome: Outcome[list[Path]] = Outcome(Stage.CARD, result=written)
    if missing := [a.path for a in m.artifacts if a.probe and not a.plans]:
        raise MoeprepError(f"no plan of {missing[0]} is recorded, and the card shows one",
                           f"run {hint('moeprep', 'plan', out)} where the GGUFs are")
    m.card = card_record(m, options)
    if not dry_run:
        mf.save(out, m)
        plot(m, out)
    for repo in repos(m, options.repo_id, options.layout):
        body = render(m, repo, m.card, options.template)
        path = out / repo.card
        if problems := [p for p in lint_text(body, path, m) if not (options.draft and p in DRAFT)]:
            raise MoeprepError(f"card lint failed for {repo.card} ({len(problems)} problem{'s' * (len(problems) != 1)}; "
                               f"first: {problems[0]})",
                               "nothing was written; with --template, fix the template, else report a moeprep bug")
        written.append(path)
        if path.is_file() and not path.is_symlink() and path.read_bytes() == body.encode("utf-8"):
            outcome.kept.append(repo.card)
            continue
        if not dry_run:
            write_text(path, body, root=out)
        outcome.made.append(repo.card)
    return outcome


def plot(manifest: Manifest, out: Path) -> Path | None:
    """Decode speed (and VRAM where measured) per quant and placement, as a PNG beside the card."""
    entries = [(a.quant, e) for a in manifest.artifacts if (e := manifest.smoke_result(a))]
    s = manifest.smoke
    if not entries or s is None:
        return None

    matplotlib.use("Agg")

    placements = sorted({p for _, e in entries for p in e.placements})
    has_vram = any(r.gpu_mib() is not None for _, e in entries for r in e.placements.values())
    quality = [(a, e.quality) for a in manifest.artifacts if (e := manifest.smoke_result(a)) and e.quality
               and e.quality.finite]
    curves = offload_curves(manifest)
    panels = 1 + has_vram + bool(quality) + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    width = 0.8 / len(placements)
    for i, p in enumerate(placements):
        xs = [j + i * width for j in range(len(entries))]
        results = [e.placements.get(p) for _, e in entries]
        axes[0][0].bar(xs, [r.decode_tps.mean or 0 if r else 0 for r in results], width,
                       yerr=[r.decode_tps.sd or 0 if r else 0 for r in results], label=p)
        if has_vram:
            axes[0][1].bar(xs, [r.gpu_mib() or 0 if r else 0 for r in results], width, label=p)
    for ax, title in zip(axes[0], ["decode tok/s (mean ± sd)", "GPU: model + KV + compute buffers (MiB)"][:1 + has_vram], strict=False):
        ax.set_xticks([j + width * (len(placements) - 1) / 2 for j in range(len(entries))], [q for q, _ in entries])
        ax.set_title(title)
        ax.legend()
    if curves:  # the offload curve: how much speed each GiB left on the GPU buys, one line per file
        ax = axes[0][-1 - bool(quality)]
        measured_x = all(c.measured_memory for c in curves)
        for c in curves:
            ax.plot([x / 2**20 for x in c.memory], c.tps, marker="o", label=c.quant)
            for x, y, name in zip(c.memory, c.tps, c.placements, strict=True):
                ax.annotate(name.removeprefix("n-cpu-moe="), (x / 2**20, y), fontsize=7)
        ax.set_xlabel("GPU memory (MiB): " + ("model + KV + compute buffers, measured" if measured_x
                                              else "weights left on the GPU, predicted (no GPU measured)"))
        ax.set_title("offload curve: decode tok/s by placement")
        ax.legend()
    if quality:  # size against quality, one point per file: does a mix beat a plain quant of its size?
        ax = axes[0][-1]
        for a, q in quality:
            ax.errorbar(a.size / 2**20, q.kld_mean, yerr=q.kld_se or 0, fmt="o", capsize=3)
            ax.annotate(a.quant, (a.size / 2**20, q.kld_mean), fontsize=8)
        ax.set_xlabel("file size (MiB)")
        ax.set_title("mean KLD vs F16 (± standard error) against file size")
    fig.suptitle(f"measured by moeprep, backend {s.backend}, {s.hardware.cpu}, N={s.settings.runs}", fontsize=9)
    fig.tight_layout()
    path = out / PLOT
    with write_aside(path, root=out) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
