"""Composes the stages: download → convert → quantize → probe, recorded in the manifest.

Every step checks the manifest first: an output that exists, hashes to the recorded sha256 and was
made from the same input with the same settings is kept; anything else is redone. The manifest is
saved after each step, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import convert as convert_stage
from . import download as download_stage
from . import manifest as mf
from . import probe as probe_stage
from . import quantize as quantize_stage
from .errors import MoeprepError
from .files import check_free_space, sha256_file
from .manifest import Artifact, Manifest
from .tools import versions

Status = Callable[[str], None]  # one line of what is happening, for humans

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ImatrixSpec:
    text: Path  # calibration text
    quants: list[str]  # the quants made with the imatrix
    ctx: int = 512
    chunks: int = 0


@dataclass
class PrepareResult:
    out: Path
    manifest: Manifest
    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def artifact_name(model: str, quant: str) -> str:
    return f"{model}-{quant}.gguf"


def default_out(model: str) -> Path:
    return Path(f"{model}-GGUF")


def up_to_date(out: Path, artifact: Artifact | None, made_from: str, settings: dict) -> bool:
    if artifact is None or artifact.made_from != made_from or artifact.settings != settings:
        return False
    path = out / artifact.path
    if not path.is_file() or path.stat().st_size != artifact.size:
        return False
    return sha256_file(path) == artifact.sha256


def record(out: Path, path: Path, quant: str, stage: str, made_from: str, settings: dict) -> Artifact:
    from . import progress

    with progress.bar(f"sha256 {path.name}", path.stat().st_size) as bar:
        digest = sha256_file(path, bar.update)
    return Artifact(str(path.relative_to(out)), quant, path.stat().st_size, digest, stage, made_from, settings)


def _same_disk(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def prepare(
    source: str,
    *,
    out: Path | None = None,
    outtype: str = "f16",
    quants: list[str] | tuple[str, ...] = quantize_stage.DEFAULT_QUANTS,
    revision: str | None = None,
    nthread: int = 0,
    imatrix: ImatrixSpec | None = None,
    status: Status = lambda line: None,
) -> PrepareResult:
    quants = quantize_stage.check_types(list(quants), allow_imatrix=imatrix is not None)
    if imatrix is not None:
        imatrix.quants = quantize_stage.check_types(imatrix.quants, allow_imatrix=True)
        if missing := [q for q in quants if q in quantize_stage.NEEDS_IMATRIX and q not in imatrix.quants]:
            raise MoeprepError(f"{', '.join(missing)} need the importance matrix", "list them among the imatrix quants")
    local = Path(source)
    if local.is_dir():
        model_name = local.resolve().name
    elif REPO_ID.match(source) and not local.exists():
        model_name = source.split("/")[-1]
    else:
        raise MoeprepError(f"{source} is neither a model directory nor a Hub repo id", "pass org/name or a folder")
    out = Path(out) if out else default_out(model_name)
    out.mkdir(parents=True, exist_ok=True)
    base = artifact_name(model_name, outtype.upper())

    if local.is_dir():
        folder, src = local, None
    else:
        status(f"resolving {source}@{revision or 'main'}")
        snap = download_stage.resolve(source, revision)
        status(f"{source}@{snap.revision} is commit {snap.commit}: {len(snap.files)} files")
        _check_disk_for_download(snap, out, quants, base)
        folder, src = download_stage.download(snap)
    model = convert_stage.read_source(folder)
    if src is None:
        src = download_stage.local_source(folder)
    src.architecture = model.architecture
    planned = model.n_params * 2 + sum(quantize_stage.planned_size(model.n_params, q) for q in quants)
    old = mf.load_or_none(out)
    if old is None:
        check_free_space(out, planned, f"the F16 and {len(quants)} quants")

    manifest = Manifest(model=model_name, source=src, tools=versions(),
                        artifacts=old.artifacts if old else [], probe=old.probe if old else None,
                        smoke=old.smoke if old else None, imatrix=old.imatrix if old else None)
    result = PrepareResult(out, manifest)

    fingerprint = mf.source_fingerprint(src.files)
    settings = {"outtype": outtype}
    f16 = manifest.artifact(outtype.upper())
    if up_to_date(out, f16, fingerprint, settings):
        result.kept.append(base)
    else:
        status(f"converting {model.architecture} ({model.n_params / 1e6:.1f}M parameters) to {base}")
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        convert_stage.convert(model, out / base, outtype, logs / f"convert-{outtype}.log", model_name)
        f16 = record(out, out / base, outtype.upper(), "convert", fingerprint, settings)
        manifest.put(f16)
        result.made.append(base)
    mf.save(out, manifest)

    report = probe_stage.probe(out / base)
    manifest.probe = report.to_dict()
    mf.save(out, manifest)

    imat = _imatrix(out, manifest, f16, imatrix, status) if imatrix and imatrix.quants else None
    for q in quants:
        name = artifact_name(model_name, q)
        settings = {"ftype": q}
        use = imat is not None and q in imatrix.quants
        if use:
            settings["imatrix"] = imat["sha256"]
        if up_to_date(out, manifest.artifact(q), f16.sha256, settings):
            result.kept.append(name)
            continue
        status(f"quantizing {base} to {q}" + (" with the importance matrix" if use else ""))
        if use:
            from . import imatrix as imatrix_stage

            imatrix_stage.quantize(out / base, out / name, q, out / imat["path"], out / "logs" / f"quantize-{q}.log",
                                   nthread)
        else:
            quantize_stage.quantize(out / base, out / name, q, nthread)
        manifest.put(record(out, out / name, q, "quantize", f16.sha256, settings))
        mf.save(out, manifest)
        result.made.append(name)
    return result


def _imatrix(out: Path, manifest: Manifest, f16: Artifact, spec: ImatrixSpec, status: Status) -> dict:
    """Compute the importance matrix from the F16 unless the recorded one is for the same F16, text and settings."""
    from . import imatrix as imatrix_stage

    text_sha = sha256_file(spec.text)
    want = {"made_from": f16.sha256, "text": spec.text.name, "text_sha256": text_sha, "ctx": spec.ctx,
            "chunks": spec.chunks}
    old = manifest.imatrix
    path = out / "imatrix.gguf"
    if old and all(old.get(k) == v for k, v in want.items()) and path.is_file() and sha256_file(path) == old["sha256"]:
        return old
    status(f"computing the importance matrix on {spec.text.name}")
    (out / "logs").mkdir(exist_ok=True)
    imatrix_stage.compute(out / f16.path, spec.text, path, out / "logs" / "imatrix.log", spec.ctx, spec.chunks)
    manifest.imatrix = {"path": path.name, "sha256": sha256_file(path), **want, "quants": spec.quants,
                        "tool": imatrix_stage.version()}
    mf.save(out, manifest)
    return manifest.imatrix


def _check_disk_for_download(snap: download_stage.RepoSnapshot, out: Path, quants: list[str], base: str) -> None:
    """Before any byte moves: room for what is not cached yet, and for the outputs."""
    from huggingface_hub import constants

    missing = download_stage.missing_bytes(snap)
    weights = sum(f.size for f in snap.files if f.path.endswith(".safetensors"))
    n_params = weights // 2  # Hub checkpoints are bf16/f16; read_source counts exactly later
    outputs = n_params * 2 + sum(quantize_stage.planned_size(n_params, q) for q in quants)
    if (out / base).exists():
        outputs = 0  # a rerun: the outputs are already (mostly) on disk
    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    if _same_disk(cache, out):
        check_free_space(out, missing + outputs, f"the download ({snap.repo_id}) and the GGUF outputs")
    else:
        check_free_space(cache, missing, f"the download of {snap.repo_id}")
        check_free_space(out, outputs, "the GGUF outputs")


def quantize_file(src: Path, quants: list[str], nthread: int = 0, status: Status = lambda line: None,
                  imatrix: Path | None = None) -> list[Artifact]:
    """The quantize stage alone: writes `<Model>-<QUANT>.gguf` beside `src`, recorded in its manifest if it has one."""
    src = Path(src)
    quants = quantize_stage.check_types(quants, allow_imatrix=imatrix is not None)
    if imatrix is not None and not Path(imatrix).is_file():
        raise MoeprepError(f"importance matrix {imatrix} not found", "compute one with `moeprep imatrix`")
    probe_stage.probe(src)  # refuse a truncated or non-GGUF input with a clear message
    out = src.parent
    model = re.sub(r"-(F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    manifest = mf.load_or_none(out)
    check_free_space(out, sum(quantize_stage.planned_size(src.stat().st_size // 2, q) for q in quants), "the quants")
    src_sha256 = sha256_file(src)
    made = []
    for q in quants:
        dst = out / artifact_name(model, q)
        settings = {"ftype": q} | ({"imatrix": sha256_file(imatrix)} if imatrix else {})
        if manifest and up_to_date(out, manifest.artifact(q), src_sha256, settings):
            made.append(manifest.artifact(q))
            continue
        status(f"quantizing {src.name} to {q}")
        if imatrix:
            from . import imatrix as imatrix_stage

            (out / "logs").mkdir(exist_ok=True)
            imatrix_stage.quantize(src, dst, q, Path(imatrix), out / "logs" / f"quantize-{q}.log", nthread)
        else:
            quantize_stage.quantize(src, dst, q, nthread)
        artifact = record(out, dst, q, "quantize", src_sha256, settings)
        made.append(artifact)
        if manifest:
            manifest.put(artifact)
            mf.save(out, manifest)
    return made
