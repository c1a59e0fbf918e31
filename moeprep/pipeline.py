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

from . import convert as convert_stage
from . import download as download_stage
from . import hub
from . import manifest as mf
from . import probe as probe_stage
from . import progress
from . import quantize as quantize_stage
from .errors import MoeprepError
from .files import check_free_space, sha256_file
from .manifest import Artifact, ArtifactSettings, ImatrixRecord, Manifest
from .outcome import Outcome, Status, quiet
from .tools import versions


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


def record(out: Path, path: Path, quant: str, stage: str, made_from: str, settings: ArtifactSettings) -> Artifact:
    """The artifact record of a finished file: its sha256 and its probe (the header alone, so cheap)."""
    with progress.bar(f"sha256 {path.name}", path.stat().st_size) as bar:
        digest = sha256_file(path, bar.update)
    return Artifact(str(path.relative_to(out)), quant, path.stat().st_size, digest, stage, made_from, settings,
                    probe=probe_stage.probe(path))


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
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        convert_stage.convert(model, out / base, outtype, logs / f"convert-{outtype}.log", name)
        manifest.put(record(out, out / base, outtype.upper(), "convert", fingerprint, settings))
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
    import shutil

    notes = []
    for a in [a for a in manifest.artifacts if a is not base and (a.stage == "convert" or a.made_from != base.sha256)]:
        manifest.remove(a)
        (out / a.path).unlink(missing_ok=True)
        for s in a.shards:
            (out / s.path).unlink(missing_ok=True)
        if a.shards:
            shutil.rmtree(out / a.quant, ignore_errors=True)
        notes.append(f"removed {a.path}: it was made from an earlier {base.quant}, not the current one")
    if manifest.imatrix and manifest.imatrix.made_from != base.sha256:
        manifest.imatrix = None
    return notes


def quantize_model(out: Path, *, quants: list[str], nthread: int = 0, imatrix: ImatrixSpec | None = None,
                   status: Status = quiet) -> Outcome:
    """Make every quant in `quants` from the directory's converted file; the result is the Manifest."""
    manifest = mf.load(out)
    f16 = manifest.base
    if f16 is None:
        raise MoeprepError(f"the manifest in {out} has no converted file to quantize", "run `moeprep convert` first")
    outcome = Outcome("quantize", result=manifest)
    quants = quantize_stage.check_types(quants, allow_imatrix=imatrix is not None)
    if f16.quant in quants:  # the converted file is that type already: quantizing it would overwrite it
        outcome.notes.append(f"{f16.quant} is the converted file itself ({f16.path}); nothing to quantize")
        quants = [q for q in quants if q != f16.quant]
    imat = _imatrix(out, manifest, f16, imatrix, status) if imatrix and imatrix.quants else None
    for q in quants:
        name = artifact_name(manifest.model, q)
        use = imat is not None and q in imatrix.quants
        settings = ArtifactSettings(ftype=q, imatrix=imat.sha256 if use else None)
        if up_to_date(out, manifest.artifact(q), f16.sha256, settings):
            outcome.kept.append(name)
            continue
        status(f"quantizing {f16.path} to {q}" + (" with the importance matrix" if use else ""))
        if use:
            from . import imatrix as imatrix_stage

            imatrix_stage.quantize(out / f16.path, out / name, q, out / imat.path, out / "logs" / f"quantize-{q}.log",
                                   nthread)
        else:
            quantize_stage.quantize(out / f16.path, out / name, q, nthread)
        manifest.put(record(out, out / name, q, "quantize", f16.sha256, settings))
        mf.save(out, manifest)
        outcome.made.append(name)
    return outcome


def prepare(source: str, *, out: Path | None = None, outtype: str = "f16",
            quants: list[str] | tuple[str, ...] = quantize_stage.DEFAULT_QUANTS, revision: str | None = None,
            nthread: int = 0, imatrix: ImatrixSpec | None = None, status: Status = quiet) -> Outcome:
    """`moeprep convert`: convert, then quantize; one Outcome for both, its result the final Manifest."""
    quants = quantize_stage.check_types(list(quants), allow_imatrix=imatrix is not None)
    if imatrix is not None:
        imatrix.quants = quantize_stage.check_types(imatrix.quants, allow_imatrix=True)
        if missing := [q for q in quants if q in quantize_stage.NEEDS_IMATRIX and q not in imatrix.quants]:
            raise MoeprepError(f"{', '.join(missing)} need the importance matrix", "list them among the imatrix quants")
    out = Path(out) if out else default_out(model_name(source))
    converted = convert_model(source, out=out, outtype=outtype, revision=revision, quants=quants, status=status)
    quantized = quantize_model(out, quants=quants, nthread=nthread, imatrix=imatrix, status=status)
    return Outcome("convert", converted.made + quantized.made, converted.kept + quantized.kept,
                   converted.notes + quantized.notes, quantized.result)


def _imatrix(out: Path, manifest: Manifest, f16: Artifact, spec: ImatrixSpec, status: Status) -> ImatrixRecord:
    """Compute the importance matrix from the F16 unless the recorded one is for the same F16, text and settings."""
    from . import imatrix as imatrix_stage

    text_sha = sha256_file(spec.text)
    old = manifest.imatrix
    path = out / "imatrix.gguf"
    if (old and (old.made_from, old.text, old.text_sha256, old.ctx, old.chunks)
            == (f16.sha256, spec.text.name, text_sha, spec.ctx, spec.chunks)
            and path.is_file() and sha256_file(path) == old.sha256):
        return old
    status(f"computing the importance matrix on {spec.text.name}")
    (out / "logs").mkdir(exist_ok=True)
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
                  imatrix: Path | None = None) -> Outcome:
    """`moeprep quantize`: `<Model>-<QUANT>.gguf` beside `src`, recorded in its manifest if it has one.

    The outcome's result is the list of Artifacts, made or kept.
    """
    src = Path(src)
    quants = quantize_stage.check_types(quants, allow_imatrix=imatrix is not None)
    if imatrix is not None and not Path(imatrix).is_file():
        raise MoeprepError(f"importance matrix {imatrix} not found", "compute one with `moeprep imatrix`")
    report = probe_stage.probe(src)  # refuse a missing, truncated or non-GGUF input with a clear message
    out = src.parent
    model = re.sub(r"-(F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    manifest = mf.load_or_none(out)
    outcome = Outcome("quantize", result=[])
    own = manifest.artifact_at(src.name) if manifest else None
    if own is not None and own.quant in quants:
        outcome.notes.append(f"{own.quant} is the input file itself; nothing to quantize")
        quants = [q for q in quants if q != own.quant]
    check_free_space(out, sum(quantize_stage.planned_size(report.n_params, q) for q in quants), "the quants")
    src_sha256 = sha256_file(src)
    for q in quants:
        dst = out / artifact_name(model, q)
        settings = ArtifactSettings(ftype=q, imatrix=sha256_file(imatrix) if imatrix else None)
        if manifest and up_to_date(out, manifest.artifact(q), src_sha256, settings):
            outcome.result.append(manifest.artifact(q))
            outcome.kept.append(dst.name)
            continue
        status(f"quantizing {src.name} to {q}")
        if imatrix:
            from . import imatrix as imatrix_stage

            (out / "logs").mkdir(exist_ok=True)
            imatrix_stage.quantize(src, dst, q, Path(imatrix), out / "logs" / f"quantize-{q}.log", nthread)
        else:
            quantize_stage.quantize(src, dst, q, nthread)
        artifact = record(out, dst, q, "quantize", src_sha256, settings)
        outcome.result.append(artifact)
        outcome.made.append(dst.name)
        if manifest:
            manifest.put(artifact)
            mf.save(out, manifest)
    return outcome
