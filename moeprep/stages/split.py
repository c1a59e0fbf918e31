"""Split a GGUF into llama.cpp shards (`<name>-00001-of-00003.gguf`) with gguf-py's own writer.

GGUFWriter's split mode is what convert_hf_to_gguf --split-max-size uses: the first shard carries
the metadata, every shard carries split.no / split.count / split.tensors.count, and llama.cpp loads
the set from the first shard. Tensor bytes are streamed from the reader's memory map.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from moeprep import progress
from moeprep.errors import MoeprepError
from moeprep.files import human_bytes, make_dirs, remove, sha256_file
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, Shard
from moeprep.records.outcome import Outcome, Stage, Status, quiet

MAX_SHARDS = 1000  # per file: llama.cpp names up to 99999, but a Hub repo of thousands of files is no release


def split(src: Path, out_dir: Path, max_bytes: int, before_rename=None, *, root: Path) -> list[Path]:
    """Write `src` as shards of at most `max_bytes` of tensor data into `out_dir` (aside, then renamed).

    `before_rename(shards)` sees the complete shards in the work folder before the folder takes its name,
    so they can be recorded first: a kill never leaves final-named shards the manifest does not list.
    """
    reader = gguf.GGUFReader(src, "r")
    arch = str(reader.fields["general.architecture"].contents())
    work = out_dir.with_name(out_dir.name + ".partial")
    remove(root, work)
    make_dirs(root, work)
    writer = gguf.GGUFWriter(work / src.name, arch, split_max_size=max_bytes)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "split.")):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with progress.bar(f"split {src.name}", sum(int(t.n_bytes) for t in reader.tensors)) as bar:
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            bar.update(int(t.n_bytes))
    writer.close()
    shards = sorted(work.iterdir())
    remove(root, out_dir)
    if before_rename is not None:
        before_rename(shards)
    os.replace(work, out_dir)
    return [out_dir / p.name for p in shards]


def stage(out: Path, max_bytes: int, *, dry_run: bool = False, status: Status = quiet) -> Outcome[mf.Manifest]:
    """Split every artifact larger than `max_bytes` with llama.cpp's shard naming, and record the shards.

    Shards already made from the same bytes at the same size limit are kept; an artifact that fits now loses its
    shards' record. The outcome's result is the manifest as saved.
    """
    manifest = mf.load(out)
    if (most := max((-(-a.size // max_bytes) for a in manifest.artifacts), default=0)) > MAX_SHARDS:
        raise MoeprepError(f"shards of {human_bytes(max_bytes)} would split a file into {most} pieces; moeprep makes at "
                           f"most {MAX_SHARDS} per file", "give a larger shard size (the Hub's limit is 50 GB)")
    outcome: Outcome[mf.Manifest] = Outcome(Stage.SPLIT, result=manifest)
    for a in manifest.artifacts:
        if a.size <= max_bytes:
            if a.shards:
                a.shards = []
                mf.save(out, manifest)
            continue
        if _current(out, a, max_bytes):
            outcome.kept += [s.path for s in a.shards]
            continue
        if dry_run:
            outcome.notes.append(f"{a.path} would be split into shards of at most {max_bytes} bytes of tensor data")
            continue
        status(f"splitting {a.path} into shards of at most {max_bytes} bytes")

        def record(work: list[Path], a: Artifact = a) -> None:
            a.shards = [Shard(f"{a.quant}/{p.name}", p.stat().st_size, sha256_file(p), a.sha256, max_bytes,
                              p.stat().st_mtime_ns) for p in work]
            mf.save(out, manifest)

        split(out / a.path, out / a.quant, max_bytes, before_rename=record, root=out)
        outcome.made += [s.path for s in a.shards]
    return outcome


def _current(out: Path, a: Artifact, max_bytes: int) -> bool:
    return bool(a.shards) and all(
        s.made_from == a.sha256 and s.max_bytes == max_bytes and (out / s.path).is_file()
        and (out / s.path).stat().st_size == s.size for s in a.shards)
