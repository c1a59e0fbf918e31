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
    status: Status = lambda line: None,
) -> PrepareResult:
    quants = quantize_stage.check_types(list(quants))
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
    planned = model.n_params * 2 + sum(quantize_stage.planned_size(model.n_params, q) for q in quants)
    old = mf.load_or_none(out)
    if old is None:
        check_free_space(out, planned, f"the F16 and {len(quants)} quants")

    manifest = Manifest(model=model_name, source=src, tools=versions(),
                        artifacts=old.artifacts if old else [], probe=old.probe if old else None,
                        smoke=old.smoke if old else None)
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

    for q in quants:
        name = artifact_name(model_name, q)
        settings = {"ftype": q}
        if up_to_date(out, manifest.artifact(q), f16.sha256, settings):
            result.kept.append(name)
            continue
        status(f"quantizing {base} to {q}")
        quantize_stage.quantize(out / base, out / name, q, nthread)
        manifest.put(record(out, out / name, q, "quantize", f16.sha256, settings))
        mf.save(out, manifest)
        result.made.append(name)
    return result


def _check_disk_for_download(snap: download_stage.RepoSnapshot, out: Path, quants: list[str], base: str) -> None:
    """Before any byte moves: room for what is not cached yet, and for the outputs."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = sum(
        f.size for f in snap.files
        if not isinstance(try_to_load_from_cache(snap.repo_id, f.path, revision=snap.commit), str)
    )
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


def quantize_file(src: Path, quants: list[str], nthread: int = 0, status: Status = lambda line: None) -> list[Artifact]:
    """The quantize stage alone: writes `<Model>-<QUANT>.gguf` beside `src`, recorded in its manifest if it has one."""
    src = Path(src)
    quants = quantize_stage.check_types(quants)
    probe_stage.probe(src)  # refuse a truncated or non-GGUF input with a clear message
    out = src.parent
    model = re.sub(r"-(F16|BF16|F32)$", "", src.stem, flags=re.IGNORECASE)
    manifest = mf.load_or_none(out)
    check_free_space(out, sum(quantize_stage.planned_size(src.stat().st_size // 2, q) for q in quants), "the quants")
    src_sha256 = sha256_file(src)
    made = []
    for q in quants:
        dst = out / artifact_name(model, q)
        settings = {"ftype": q}
        if manifest and up_to_date(out, manifest.artifact(q), src_sha256, settings):
            made.append(manifest.artifact(q))
            continue
        status(f"quantizing {src.name} to {q}")
        quantize_stage.quantize(src, dst, q, nthread)
        artifact = record(out, dst, q, "quantize", src_sha256, settings)
        made.append(artifact)
        if manifest:
            manifest.put(artifact)
            mf.save(out, manifest)
    return made
