"""Importance-matrix stage: `moeprep imatrix` (one file, anywhere its user puts it, never over a file a manifest
lists), and `ensure`, which a quantize stage runs for the outputs a plan makes with one: computed from the F16
unless the recorded matrix was made from the same F16, text and settings."""

from __future__ import annotations

from pathlib import Path

from moeprep.errors import MoeprepError
from moeprep.files import sha256_file
from moeprep.ggufio.probe import probe
from moeprep.inputs import short
from moeprep.llama import imatrix as imatrix_file
from moeprep.quants import ImatrixSpec
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, ImatrixRecord, Manifest
from moeprep.records.outcome import Status

FILENAME = "imatrix.gguf"


def make(model: Path, text: Path, out: Path, ctx: int = 512, chunks: int = 0) -> ImatrixRecord:
    """`moeprep imatrix`: compute it, and describe it as the manifest records one."""
    if out.suffix != ".gguf" or out.name.startswith("."):
        raise MoeprepError(f"--out {short(str(out))} is not a .gguf file name", "name the importance matrix NAME.gguf")
    if not out.parent.is_dir():
        raise MoeprepError(f"{short(str(out.parent))} is not a directory", "give --out in an existing directory")
    imatrix_file.check_text(text)
    trained = probe(model, n_values=[]).context_length  # also refuses a missing, truncated or non-GGUF model
    if trained and ctx > trained:
        raise MoeprepError(f"--ctx {ctx} is longer than the {trained} tokens {model.name} was trained for",
                           f"give --ctx {trained} or less")
    listed = mf.load_or_none(out.parent)  # --out may name any file: never one its directory's manifest lists
    protected = listed.listed() if listed else {mf.FILENAME}
    imatrix_file.compute(model, text, out, out.with_name(out.stem + ".log"), ctx, chunks, protected=protected)
    return ImatrixRecord(out.name, sha256_file(out), _model_sha256(model), text.name, sha256_file(text), ctx, chunks,
                         [], imatrix_file.version(), imatrix_file.coverage(out))


def ensure(out: Path, manifest: Manifest, f16: Artifact, spec: ImatrixSpec, status: Status) -> ImatrixRecord:
    """The directory's importance matrix for `spec`: the recorded one when it still is what `spec` asks for."""
    assert spec.text is not None
    imatrix_file.check_text(spec.text)
    text_sha = sha256_file(spec.text)
    old = manifest.imatrix
    path = out / FILENAME
    if (old and (old.made_from, old.text, old.text_sha256, old.ctx, old.chunks)
            == (f16.sha256, spec.text.name, text_sha, spec.ctx, spec.chunks)
            and path.is_file() and sha256_file(path) == old.sha256):
        if old.coverage is None:  # recorded before moeprep read it: the file says
            old.coverage = imatrix_file.coverage(path)
            mf.save(out, manifest)
        return old
    status(f"computing the importance matrix on {spec.text.name}")
    imatrix_file.compute(out / f16.path, spec.text, path, out / "logs" / "imatrix.log", spec.ctx, spec.chunks,
                         root=out, protected=manifest.listed())
    manifest.imatrix = ImatrixRecord(path.name, sha256_file(path), f16.sha256, spec.text.name, text_sha, spec.ctx,
                                     spec.chunks, list(spec.quants), imatrix_file.version(), imatrix_file.coverage(path))
    mf.save(out, manifest)
    for line in imatrix_file.coverage_lines(manifest.imatrix.coverage or [])[-1:]:
        status(f"importance matrix: {line}")
    return manifest.imatrix


def _model_sha256(model: Path) -> str:
    """The F16's sha256 as its manifest records it, where the file is the one recorded (same size); hashing
    an 80 GB file again would take a minute."""
    manifest = mf.load_or_none(model.parent)
    known = manifest.artifact_at(model.name) if manifest else None
    if known is not None and model.stat().st_size == known.size:
        return known.sha256
    return sha256_file(model)
