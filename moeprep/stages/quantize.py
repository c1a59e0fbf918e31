"""Quantize stage: every output of a QuantPlan made from the directory's converted file with libllama's own
quantizer (llama/quantize.py), each kept where it is up to date and recorded before it takes its name; and
`quantize_file`, the same for one GGUF given on the command line.
"""

from __future__ import annotations

import re
from pathlib import Path

from moeprep import quants
from moeprep.errors import MoeprepError
from moeprep.files import check_free_space, sha256_file
from moeprep.ggufio.probe import probe, read
from moeprep.llama import imatrix as imatrix_file
from moeprep.llama import quantize as quantizer
from moeprep.llama.quantize import Sized
from moeprep.quants import QuantPlan, Target
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.stages import imatrix as imatrix_stage
from moeprep.stages import plan as plan_stage
from moeprep.stages.artifacts import recorder, up_to_date


def quantize_model(out: Path, plan: QuantPlan, *, nthread: int = 0, status: Status = quiet) -> Outcome[mf.Manifest]:
    """Make every output of `plan` from the directory's converted file; the result is the Manifest."""
    manifest = mf.load(out)
    f16 = manifest.base
    if f16 is None:
        raise MoeprepError(f"the manifest in {out} has no converted file to quantize", "run `moeprep convert` first")
    outcome: Outcome[mf.Manifest] = Outcome(Stage.QUANTIZE, result=manifest, notes=list(plan.notes))
    outcome.notes += _rule_notes(out / f16.path, list(plan.targets))
    spec = plan.imatrix
    imat = imatrix_stage.ensure(out, manifest, f16, spec, status) if spec and spec.text and spec.quants else None
    loaded = None
    for t in plan.targets:
        name = plan.path(t)
        use = imat is not None and plan.uses_imatrix(t)
        settings = plan.settings(t, imat.sha256 if imat is not None and use else None)
        if up_to_date(out, manifest.artifact(t.label), f16.sha256, settings):
            outcome.kept.append(name)
            continue
        status(f"quantizing {f16.path} to {t.label}" + (" with the importance matrix" if use else ""))
        if imat is not None and use and loaded is None:
            loaded = imatrix_file.load(out / imat.path)
        quantizer.quantize(out / f16.path, out / name, t.ftype, nthread, imatrix=loaded if use else None,
                           rules=t.rules, before_rename=recorder(out, out / name, manifest, [], t.label, "quantize",
                                                                 f16.sha256, settings))
        outcome.made.append(name)
    return outcome


def file_plan(src: Path, quant_names: list[str], mixes: list[str], tensor_types: list[str], imatrix: Path | None,
              dry_run: bool = False) -> QuantPlan:
    """The plan of `moeprep quantize FILE`: outputs beside the file, named after it, an importance matrix file (if
    given) used for every one."""
    model = re.sub(r"-(F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    kind = re.search(r"-(F16|BF16|F32)$", src.stem, flags=re.IGNORECASE)
    outtype = kind.group(1).lower() if kind else "f16"
    probe_only = quants.plan(model, quant_names, mixes, tensor_types, outtype=outtype, dry_run=True, converted=False)
    spec = quants.ImatrixSpec(tuple(probe_only.labels), file=imatrix) if imatrix else None
    return quants.plan(model, quant_names, mixes, tensor_types, outtype=outtype, imatrix=spec, dry_run=dry_run,
                       converted=False)


def quantize_file(src: Path, plan: QuantPlan, *, nthread: int = 0, dry_run: bool = False,
                  status: Status = quiet) -> Outcome[list]:
    """`moeprep quantize`: the plan's outputs beside `src`, recorded in its manifest if it has one. The outcome's
    result is the list of Artifacts, made or kept; with `dry_run`, the list of Sized that llama.cpp's dry run
    gives, and nothing is written."""
    src = Path(src)
    imatrix = plan.imatrix.file if plan.imatrix else None
    if imatrix is not None and not Path(imatrix).is_file():
        raise MoeprepError(f"importance matrix {imatrix} not found", "compute one with `moeprep imatrix`")
    report = probe(src)  # refuse a missing, truncated or non-GGUF input with a clear message
    loaded = imatrix_file.load(imatrix) if imatrix else None  # a bad imatrix is refused before any work
    out = src.parent
    manifest = mf.load_or_none(out)
    outcome: Outcome[list] = Outcome(Stage.QUANTIZE, result=[], notes=list(plan.notes))
    targets = list(plan.targets)
    own = manifest.artifact_at(src.name) if manifest else None
    for t in [t for t in targets if (own is not None and t.label == own.quant) or plan.path(t) == src.name]:
        outcome.notes.append(f"{t.label} is the input file itself; nothing to quantize")
        targets.remove(t)
    outcome.notes += _rule_notes(src, targets)
    if dry_run:
        outcome.result = [_sized(src, out / plan.path(t), t, nthread, loaded) for t in targets]
        return outcome
    check_free_space(out, sum(quants.planned_size(report.n_params, t.label) for t in targets), "the quants")
    src_sha256 = sha256_file(src)
    imatrix_sha256 = sha256_file(imatrix) if imatrix else None
    made: list[Artifact] = []
    outcome.result = made
    for t in targets:
        dst = out / plan.path(t)
        settings = plan.settings(t, imatrix_sha256)
        if manifest and (kept := manifest.artifact(t.label)) and up_to_date(out, kept, src_sha256, settings):
            made.append(kept)
            outcome.kept.append(dst.name)
            continue
        status(f"quantizing {src.name} to {t.label}")
        quantizer.quantize(src, dst, t.ftype, nthread, imatrix=loaded, rules=t.rules,
                           before_rename=recorder(out, dst, manifest, made, t.label, "quantize", src_sha256, settings))
        outcome.made.append(dst.name)
    if manifest is not None:
        plan_stage.stage(out, manifest, status=status)
    return outcome


def _rule_notes(path: Path, targets: list[Target]) -> list[str]:
    if not any(t.rules for t in targets):
        return []
    tensors = [(t.name, len(t.shape)) for t in read(path).tensors]
    return quants.notes(targets, tensors, path.name)


def _sized(src: Path, dst: Path, t: Target, nthread: int, imatrix) -> Sized:
    types = quantizer.quantize(src, dst, t.ftype, nthread, imatrix=imatrix, rules=t.rules, dry_run=True)
    total, bits, by_type = quantizer.size(src, types, imatrix)
    return Sized(dst.name, t.label, t.ftype, t.mix, [str(r) for r in t.rules], total, bits, by_type)
