"""How a stage makes an artifact: kept when it is up to date, and recorded in the manifest (sha256, probe) before
it takes its final name, so a kill at any moment leaves no final-named file the manifest does not list."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moeprep import progress
from moeprep.files import sha256_file
from moeprep.ggufio import probe as probe_stage
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, ArtifactSettings, Manifest


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


def recorder(out: Path, final: Path, manifest: Manifest | None, made: list[Artifact], quant: str, stage: str,
             made_from: str, settings: ArtifactSettings) -> Callable[[Path], None]:
    """What a stage runs on a complete `.partial` before it takes its final name: record it in the manifest, so no
    final-named file is ever on disk unlisted."""

    def commit(tmp: Path) -> None:
        artifact = record(out, tmp, quant, stage, made_from, settings, final=final)
        made.append(artifact)
        if manifest is not None:
            manifest.put(artifact)
            mf.save(out, manifest)

    return commit
