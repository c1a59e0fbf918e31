"""The convert and quantize stages, composed by `prepare` (download → convert → probe → quantize).

Every step checks the manifest first: an output that exists, hashes to the recorded sha256 and was
made from the same input with the same settings is kept; anything else is redone. The manifest is
saved after each step, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeprep import mixes as mix_stage
from moeprep import progress
from moeprep.card import sourcecard
from moeprep.errors import MoeprepError
from moeprep.files import check_free_space, remove, sha256_file
from moeprep.ggufio import probe as probe_stage
from moeprep.hub import errors as hub
from moeprep.predict import plan as plan_stage
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, ArtifactSettings, ImatrixRecord, Manifest
from moeprep.records.outcome import Outcome, Status, quiet
from moeprep.stages import convert as convert_stage
from moeprep.stages import download as download_stage
from moeprep.stages import quantize as quantize_stage
from moeprep.tools import versions


@dataclass
class ImatrixSpec:
    text: Path  # calibration text
    quants: list[str]  # the quants made with the imatrix
    ctx: int = 512
    chunks: int = 0


DENSE = "{name} is a dense model: --cpu-moe and --n-cpu-moe will change nothing"


def artifact_name(model: str, quant: str) -> str:
    return f"{model}-{quant}.gguf"


def default_out(model: str) -> Path:
    return Path(f"{model}-GGUF")


def up_to_date(out: Path, artifact: Artifact | None, made_from: str, settings: ArtifactSettings) -> bool:
    if artifact is None or artifact.made_from != made_from or artifact.settings != settings:
        return False
    path = out / artifact.path
    if not path.is_file() or path.stat().st_size != artifact.size:
        return False
    return sha256_file(path) == artifact.sha256


def record(out: Path, path: Path, quant: str, stage: str, made_from: str, settings: ArtifactSettings,
           final: Path | None = None) -> Artifact:
    """The artifact record of a finished file (at `path`, to be named `final`): its sha256 and its probe
    (the header alone, so cheap)."""
    final = final or path
    with progress.bar(f"sha256 {final.name}", path.stat().st_size) as bar:
        digest = sha256_file(path, bar.update)
    report = probe_stage.probe(path)
    report.file = final.name
    info = path.stat()  # renaming keeps the modification time: the final file will match it
    return Artifact(str(final.relative_to(out)), quant, info.st_size, digest, stage, made_from, settings,
                    probe=report, mtime_ns=info.st_mtime_ns)


def recorder(out: Path, final: Path, manifest: Manifest | None, made: list, *args) -> Callable[[Path], None]:
    """What a stage runs on a complete `.partial` before it takes its final name: record it in the manifest
    (`args` as `record` takes them), so no final-named file is ever on disk unlisted."""

    def commit(tmp: Path) -> None:
        artifact = record(out, tmp, *args, final=final)
        made.append(artifact)
        if manifest is not None:
            manifest.put(artifact)
            mf.save(out, manifest)

    return commit


def model_name(source: str) -> str:
    """The model's name from a local directory or a Hub repo id; anything else is refused here."""
    local = Path(source)
    if local.is_dir():
        return local.resolve().name
    if local.exists():
        raise MoeprepError(f"{source} is a file, not a model directory", "give a model directory or a Hub repo id ORG/NAME")
    if hub.REPO_ID.match(source) and not source.startswith((".", "/")) and ".." not in source:
        return source.split("/")[-1]
    raise MoeprepError(f"{source} is neither a model directory nor a Hub repo id", "pass org/name or a folder")


def convert_model(source: str, *, out: Path | None = None, outtype: str = "f16", revision: str | None = None,
                  quants: list[str] | None = None, fetched: tuple[Path, mf.Source] | None = None,
                  status: Status = quiet) -> Outcome:
    """Download (for a repo id), convert to `<Model>-<OUTTYPE>.gguf`, probe it; the result is the Manifest.

    `fetched` is a download this run already made and verified (the folder and its Source record).
    """
    name = model_name(source)
    out = Path(out) if out else default_out(name)
    out.mkdir(parents=True, exist_ok=True)
    base = artifact_name(name, outtype.upper())
    quants = quants or []
    outcome = Outcome("convert")
    dense_said = False

    if fetched is not None:
        folder, src = fetched
    elif Path(source).is_dir():
        folder, src = Path(source), None
    else:
        status(f"resolving {source}@{revision or 'main'}")
        snap = download_stage.resolve(source, revision)
        status(f"{source}@{snap.revision} is commit {snap.commit}: {len(snap.files)} files")
        _check_disk_for_download(snap, out, name, quants, base)
        config = convert_stage.check_config(download_stage.fetch_config(snap))
        if not config.is_moe:  # said now, before the download, not only at the end
            status(f"note: {DENSE.format(name=source)}")
            dense_said = True
        folder, src = download_stage.download(snap)
    model = convert_stage.read_source(folder)
    if src is None:
        src = download_stage.local_source(folder)
    src.architecture = model.architecture
    src.card = sourcecard.read(folder, src)
    old = mf.load_or_none(out)
    planned = {base: model.n_params * (4 if outtype == "f32" else 2)}
    planned |= {artifact_name(name, q): quantize_stage.planned_size(model.n_params, q) for q in quants}
    missing = {n: size for n, size in planned.items() if not (out / n).is_file()}  # what is there counts as made
    what = (f"the {outtype.upper()} and " if base in missing else "") + f"{len(missing) - (base in missing)} quants"
    check_free_space(out, sum(missing.values()), what)

    if old is not None and (old.model, old.source.id) != (name, src.id):
        raise MoeprepError(f"{out} holds the GGUFs of {old.source.id}, not {src.id}: converting into it would mix two "
                           "models' files", "choose another --out, or delete that directory first")
    manifest = Manifest(model=name, source=src, tools=versions(), artifacts=old.artifacts if old else [],
                        smoke=old.smoke if old else None, imatrix=old.imatrix if old else None)
    outcome.result = manifest
    fingerprint = src.fingerprint()
    settings = ArtifactSettings(outtype=outtype)
    if up_to_date(out, manifest.artifact(outtype.upper()), fingerprint, settings):
        outcome.kept.append(base)
    else:
        status(f"converting {model.architecture} ({model.n_params / 1e6:.1f}M parameters) to {base}")
        convert_stage.convert(model, out / base, outtype, out / "logs" / f"convert-{outtype}.log", name,
                              recorder(out, out / base, manifest, [], outtype.upper(), "convert", fingerprint, settings))
        outcome.made.append(base)
    outcome.notes += _drop_stale(out, manifest, manifest.artifact(outtype.upper()))
    if manifest.probe and not manifest.probe.is_moe and not dense_said:
        outcome.notes.append(DENSE.format(name=name))
    mf.save(out, manifest)
    return outcome


def _drop_stale(out: Path, manifest: Manifest, base: Artifact) -> list[str]:
    """Remove, from the manifest and the disk, every artifact not made from `base`, the current converted file.

    Left in place they would be listed, carded and pushed as quants of a file that no longer exists.
    """

    notes = []
    for a in [a for a in manifest.artifacts if a is not base and (a.stage == "convert" or a.made_from != base.sha256)]:
        manifest.remove(a)
        remove(out, out / a.path)
        if a.shards:
            remove(out, out / a.quant)
        notes.append(f"removed {a.path}: it was made from an earlier {base.quant}, not the current one")
    if manifest.imatrix and manifest.imatrix.made_from != base.sha256:
        manifest.imatrix = None
    return notes


def quantize_model(out: Path, *, quants: list[str], mixes: list[str] = (), tensor_types: list[str] = (),
                   nthread: int = 0, imatrix: ImatrixSpec | None = None, status: Status = quiet) -> Outcome:
    """Make every quant in `quants` and every mix in `mixes` from the directory's converted file, each with the
    `tensor_types` rules first; the result is the Manifest."""
    from moeprep.stages import imatrix as imatrix_stage

    manifest = mf.load(out)
    f16 = manifest.base
    if f16 is None:
        raise MoeprepError(f"the manifest in {out} has no converted file to quantize", "run `moeprep convert` first")
    outcome = Outcome("quantize", result=manifest)
    quants = quantize_stage.check_types(quants, allow_imatrix=imatrix is not None)
    if f16.quant in quants:  # the converted file is that type already: quantizing it would overwrite it
        outcome.notes.append(f"{f16.quant} is the converted file itself ({f16.path}); nothing to quantize")
        quants = [q for q in quants if q != f16.quant]
    targets = mix_stage.targets(quants, list(mixes), list(tensor_types))
    covered = _labels(imatrix.quants) if imatrix else []
    _check_imatrix_needs(targets, covered)
    outcome.notes += _rule_notes(out / f16.path, targets)
    imat = _imatrix(out, manifest, f16, imatrix, status) if imatrix and imatrix.quants else None
    loaded = None
    for t in targets:
        name = artifact_name(manifest.model, t.label)
        use = imat is not None and t.label in covered
        settings = _settings(t, imat.sha256 if use else None)
        if up_to_date(out, manifest.artifact(t.label), f16.sha256, settings):
            outcome.kept.append(name)
            continue
        status(f"quantizing {f16.path} to {t.label}" + (" with the importance matrix" if use else ""))
        if use and loaded is None:
            loaded = imatrix_stage.load(out / imat.path)
        quantize_stage.quantize(out / f16.path, out / name, t.ftype, nthread, imatrix=loaded if use else None,
                                rules=t.rules, before_rename=recorder(out, out / name, manifest, [], t.label,
                                                                      "quantize", f16.sha256, settings))
        outcome.made.append(name)
    return outcome


def _labels(names: list[str]) -> list[str]:
    """Quant types normalised as check_types does, and mix names as moeprep ships them."""
    return [mix_stage.get(n).name if n.lower() in mix_stage.MIXES else quantize_stage.check_types([n], True)[0]
            for n in names]


def _settings(target: mix_stage.Target, imatrix: str | None) -> ArtifactSettings:
    return ArtifactSettings(ftype=target.ftype, imatrix=imatrix, mix=target.mix,
                            tensor_types=[str(r) for r in target.rules])


def _check_imatrix_needs(targets: list[mix_stage.Target], covered: list[str]) -> None:
    """A file type or a rule's tensor type that llama.cpp refuses without an importance matrix, and none given."""
    if missing := [t.label for t in targets if t.needs_imatrix and t.label not in covered]:
        raise MoeprepError(f"{', '.join(missing)} need{'s' * (len(missing) == 1)} an importance matrix, and llama.cpp "
                           "refuses it without one", "give one (--imatrix, --imatrix-text, or the recipe's imatrix "
                           "quants), or choose other types")


def _rule_notes(path: Path, targets: list[mix_stage.Target]) -> list[str]:
    if not any(t.rules for t in targets):
        return []
    tensors = [(t.name, len(t.shape)) for t in probe_stage.read(path).tensors]
    return mix_stage.notes(targets, tensors, path.name)


def prepare(source: str, *, out: Path | None = None, outtype: str = "f16",
            quants: list[str] | tuple[str, ...] = quantize_stage.DEFAULT_QUANTS, mixes: list[str] = (),
            tensor_types: list[str] = (), revision: str | None = None, nthread: int = 0,
            imatrix: ImatrixSpec | None = None, status: Status = quiet) -> Outcome:
    """`moeprep convert`: convert, then quantize; one Outcome for both, its result the final Manifest."""
    quants = quantize_stage.check_types(list(quants), allow_imatrix=imatrix is not None)
    targets = mix_stage.targets(quants, list(mixes), list(tensor_types))  # a bad mix or rule stops it before any work
    if imatrix is not None:
        imatrix.quants = _labels(imatrix.quants)
    _check_imatrix_needs(targets, imatrix.quants if imatrix else [])
    out = Path(out) if out else default_out(model_name(source))
    converted = convert_model(source, out=out, outtype=outtype, revision=revision, quants=[t.label for t in targets],
                              status=status)
    quantized = quantize_model(out, quants=quants, mixes=mixes, tensor_types=tensor_types, nthread=nthread,
                               imatrix=imatrix, status=status)
    manifest = mf.load(out)
    plan_stage.stage(out, manifest, status=status)
    return Outcome("convert", converted.made + quantized.made, converted.kept + quantized.kept,
                   converted.notes + quantized.notes, manifest)


def _imatrix(out: Path, manifest: Manifest, f16: Artifact, spec: ImatrixSpec, status: Status) -> ImatrixRecord:
    """Compute the importance matrix from the F16 unless the recorded one is for the same F16, text and settings."""
    from moeprep.stages import imatrix as imatrix_stage

    imatrix_stage.check_text(spec.text)
    text_sha = sha256_file(spec.text)
    old = manifest.imatrix
    path = out / "imatrix.gguf"
    if (old and (old.made_from, old.text, old.text_sha256, old.ctx, old.chunks)
            == (f16.sha256, spec.text.name, text_sha, spec.ctx, spec.chunks)
            and path.is_file() and sha256_file(path) == old.sha256):
        return old
    status(f"computing the importance matrix on {spec.text.name}")
    imatrix_stage.compute(out / f16.path, spec.text, path, out / "logs" / "imatrix.log", spec.ctx, spec.chunks)
    manifest.imatrix = ImatrixRecord(path.name, sha256_file(path), f16.sha256, spec.text.name, text_sha, spec.ctx,
                                     spec.chunks, spec.quants, imatrix_stage.version())
    mf.save(out, manifest)
    return manifest.imatrix


def _check_disk_for_download(snap: download_stage.RepoSnapshot, out: Path, name: str, quants: list[str],
                             base: str) -> None:
    """Before any byte moves: room for what is not cached yet, and for the outputs."""
    from huggingface_hub import constants

    missing = download_stage.missing_bytes(snap)
    weights = sum(f.size for f in snap.files if f.path.endswith(".safetensors"))
    n_params = weights // 2  # Hub checkpoints are bf16/f16; read_source counts exactly later
    planned = {base: n_params * 2} | {artifact_name(name, q): quantize_stage.planned_size(n_params, q) for q in quants}
    outputs = sum(size for name, size in planned.items() if not (out / name).is_file())  # what is there counts
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    if os.stat(cache).st_dev == os.stat(out).st_dev:
        check_free_space(out, missing + outputs, f"the download ({snap.repo_id}) and the GGUF outputs")
    else:
        check_free_space(cache, missing, f"the download of {snap.repo_id}")
        check_free_space(out, outputs, "the GGUF outputs")


def quantize_file(src: Path, quants: list[str], nthread: int = 0, status: Status = quiet,
                  imatrix: Path | None = None, *, mixes: list[str] = (), tensor_types: list[str] = (),
                  dry_run: bool = False) -> Outcome:
    """`moeprep quantize`: `<Model>-<QUANT>.gguf` (or `<Model>-<mix>.gguf`) beside `src`, recorded in its manifest
    if it has one. The outcome's result is the list of Artifacts, made or kept; with `dry_run`, the list of
    quantize.Sized that llama.cpp's dry run gives, and nothing is written.
    """
    from moeprep.stages import imatrix as imatrix_stage

    src = Path(src)
    quants = quantize_stage.check_types(quants, allow_imatrix=imatrix is not None or dry_run)
    targets = mix_stage.targets(quants, list(mixes), list(tensor_types))
    if imatrix is not None and not Path(imatrix).is_file():
        raise MoeprepError(f"importance matrix {imatrix} not found", "compute one with `moeprep imatrix`")
    if not dry_run:
        _check_imatrix_needs(targets, [t.label for t in targets] if imatrix else [])
    report = probe_stage.probe(src)  # refuse a missing, truncated or non-GGUF input with a clear message
    loaded = imatrix_stage.load(imatrix) if imatrix else None  # a bad imatrix is refused before any work
    out = src.parent
    model = re.sub(r"-(F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    manifest = mf.load_or_none(out)
    outcome = Outcome("quantize", result=[])
    own = manifest.artifact_at(src.name) if manifest else None
    if own is not None and own.quant in [t.label for t in targets]:
        outcome.notes.append(f"{own.quant} is the input file itself; nothing to quantize")
        targets = [t for t in targets if t.label != own.quant]
    outcome.notes += _rule_notes(src, targets)
    if dry_run:
        if not imatrix and (need := [t.label for t in targets if t.needs_imatrix]):
            outcome.notes.append(f"{', '.join(need)} will need an importance matrix when made for real")
        outcome.result = [_sized(src, out / artifact_name(model, t.label), t, nthread, loaded) for t in targets]
        return outcome
    check_free_space(out, sum(quantize_stage.planned_size(report.n_params, t.label) for t in targets), "the quants")
    src_sha256 = sha256_file(src)
    imatrix_sha256 = sha256_file(imatrix) if imatrix else None
    for t in targets:
        dst = out / artifact_name(model, t.label)
        settings = _settings(t, imatrix_sha256)
        if manifest and up_to_date(out, manifest.artifact(t.label), src_sha256, settings):
            outcome.result.append(manifest.artifact(t.label))
            outcome.kept.append(dst.name)
            continue
        status(f"quantizing {src.name} to {t.label}")
        quantize_stage.quantize(src, dst, t.ftype, nthread, imatrix=loaded, rules=t.rules,
                                before_rename=recorder(out, dst, manifest, outcome.result, t.label, "quantize",
                                                       src_sha256, settings))
        outcome.made.append(dst.name)
    if manifest is not None:
        plan_stage.stage(out, manifest, status=status)
    return outcome


def _sized(src: Path, dst: Path, t: mix_stage.Target, nthread: int, imatrix) -> quantize_stage.Sized:
    types = quantize_stage.quantize(src, dst, t.ftype, nthread, imatrix=imatrix, rules=t.rules, dry_run=True)
    total, bits, by_type = quantize_stage.size(src, types, imatrix)
    return quantize_stage.Sized(dst.name, t.label, t.ftype, t.mix, [str(r) for r in t.rules], total, bits, by_type)
