"""Convert stage: safetensors to GGUF with llama.cpp's convert_hf_to_gguf, into `<Model>-<OUTTYPE>.gguf`.

For a Hub repo the source is resolved to a commit, config.json alone is checked against the converter before any
weight moves, and the snapshot is downloaded and verified (stages/download.py). When the converted file is made
anew, every artifact not made from it is removed, from the manifest and the disk.

The converter runs as a child process of this interpreter: it imports torch and transformers, calls
sys.exit on errors and configures logging globally, none of which belongs in moeprep's process.
Its output goes to a log file beside the outputs; moeprep shows a byte-count progress bar instead.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from conversion import TEXT_MODEL_MAP
from safetensors import safe_open

from moeprep import child, names, progress
from moeprep.card import sourcecard
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import check_free_space, open_log, remove, write_aside
from moeprep.hub.errors import REPO_ID
from moeprep.hub.repo import cache_dir
from moeprep.hub.snapshot import RepoSnapshot, missing_bytes
from moeprep.inputs import short
from moeprep.quants import QuantPlan
from moeprep.records import manifest as mf
from moeprep.records.manifest import Artifact, ArtifactSettings, Manifest, Source
from moeprep.records.outcome import Outcome, Stage, Status, quiet
from moeprep.stages.artifacts import recorder, up_to_date
from moeprep.stages.download import local_source
from moeprep.tools import versions

# The MoE families moeprep is built for, as their config.json names them.
MOE_NAME = re.compile(r"(?i)moe|mixtral|deepseekv|gptoss|dbrx|arctic|grok|jamba")

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ConvertError(MoeprepError):
    pass


@dataclass
class SourceModel:
    folder: Path
    architecture: str
    n_params: int
    bytes: int


def supported_architectures() -> set[str]:
    return set(TEXT_MODEL_MAP)


# config.json keys that give a model's routed expert count, across the MoE families the converter knows
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class ModelConfig:
    architecture: str
    is_moe: bool


def check_config(config_path: Path) -> ModelConfig:
    """What config.json says, checked against the converter: run before any weight is read or downloaded."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoeprepError(f"{config_path.parent} has no config.json", "give a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{config_path} is not valid JSON ({e})", "download the model again") from e
    archs = config.get("architectures") or []
    if not archs:
        raise MoeprepError(f"{config_path} names no architecture", "this does not look like a transformers model")
    arch = archs[0]
    supported = supported_architectures()
    if arch not in supported:
        moe = ", ".join(sorted(a for a in supported if MOE_NAME.search(a)))
        hint = "it needs custom code, which moeprep never runs; " if config.get("auto_map") else ""
        raise ConvertError(
            f"architecture {arch} is not supported by convert_hf_to_gguf",
            f"{hint}supported MoE architectures: {moe}",
        )
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return ModelConfig(arch, any(isinstance(v := config.get(k, text.get(k)), int) and v > 1 for k in EXPERT_KEYS))


def read_source(folder: Path) -> SourceModel:
    """Check config.json and every safetensors header before any heavy work; count parameters."""
    folder = Path(folder)
    arch = check_config(folder / "config.json").architecture
    n_params = 0
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    count = 1
                    for d in sl.get_shape():
                        count *= d
                    n_params += count
        except Exception as e:  # safetensors raises SafetensorError with the parse failure
            raise IntegrityError(
                f"{path.name} is not a valid safetensors file ({e})",
                "download it again; a Hub download is checked against its sha256",
            ) from e
        total += path.stat().st_size
    if not n_params:
        raise MoeprepError(f"{folder} has no safetensors weights", "give a model directory with *.safetensors files")
    return SourceModel(folder, arch, n_params, total)


def convert(source: SourceModel, out: Path, outtype: str, log_path: Path, model_name: str,
            before_rename=None) -> None:
    """Run convert_hf_to_gguf into `out` (written aside; `before_rename` sees the complete file; then renamed)."""
    expected = source.n_params * (4 if outtype == "f32" else 2)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HUB_OFFLINE"] = "1"  # the converter reads local files only; nothing may reach the network
    with write_aside(out, expected, before_rename) as tmp, open_log(log_path, root=out.parent) as log:
        cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(source.folder),
               "--outfile", str(tmp), "--outtype", outtype, "--model-name", model_name]
        with progress.bar(f"convert → {out.name}", expected) as bar:
            def tick():
                if tmp.exists():
                    bar.update(max(0, min(tmp.stat().st_size, expected) - bar.n))

            rc = child.run(cmd, log=log, env=env, tick=tick)
        if rc != 0:
            log.flush()
            raise _failure(log_path, source.architecture)
        if not tmp.is_file():
            raise ConvertError(f"convert_hf_to_gguf wrote no file for {source.folder}", f"see {log_path}")


def _failure(log_path: Path, arch: str) -> ConvertError:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if "is not supported" in text:
        return ConvertError(f"architecture {arch} is not supported by convert_hf_to_gguf", f"see {log_path}")
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|error:", line)]
    last = (errors or lines or ["no output"])[-1].strip()
    return ConvertError(f"convert_hf_to_gguf failed: {last}", f"the full log is {log_path}")


DENSE = "{name} is a dense model: --cpu-moe and --n-cpu-moe will change nothing"


def default_out(model: str) -> Path:
    return Path(f"{model}-GGUF")


def model_name(source: str) -> str:
    """The model's name from a local directory or a Hub repo id; anything else is refused here."""
    local = Path(source)
    if local.is_dir():
        return names.model_name(local.resolve().name, f"the model directory {short(str(local))}")
    if local.exists():
        raise MoeprepError(f"{source} is a file, not a model directory", "give a model directory or a Hub repo id ORG/NAME")
    if REPO_ID.fullmatch(source) and not source.startswith((".", "/")) and ".." not in source:
        return names.model_name(source.split("/")[-1], f"the repo id {short(source)}")
    raise MoeprepError(f"{source} is neither a model directory nor a Hub repo id", "pass org/name or a folder")


def convert_model(folder: Path, src: Source | None, plan: QuantPlan, *, out: Path, dense_note: bool = True,
                  status: Status = quiet) -> Outcome[Manifest]:
    """Convert the model in `folder` to `<Model>-<OUTTYPE>.gguf` and probe it; the result is the Manifest.

    `src` is the download's verified record of the folder (None: a local directory, hashed here); `plan` is what
    the run makes, whose outputs count in the disk check. `dense_note`: say that a dense model gains nothing from
    the MoE placements (a download says it before the weights move).
    """
    name, outtype = plan.model, plan.outtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = plan.base
    outcome: Outcome[Manifest] = Outcome(Stage.CONVERT)
    model = read_source(folder)
    if src is None:
        src = local_source(folder)
    src.architecture = model.architecture
    src.card = sourcecard.read(folder, src)
    old = mf.load_or_none(out)
    missing = {n: size for n, size in plan.sizes(model.n_params).items() if not (out / n).is_file()}  # there: made
    what = (f"the {outtype.upper()} and " if base in missing else "") + f"{len(missing) - (base in missing)} quants"
    check_free_space(out, sum(missing.values()), what)

    if old is not None and (old.model, old.source.id) != (name, src.id):
        raise MoeprepError(f"{out} holds the GGUFs of {old.source.id}, not {src.id}: converting into it would mix two "
                           "models' files", "choose another --out, or delete that directory first")
    manifest = Manifest(model=name, source=src, tools=versions(), artifacts=old.artifacts if old else [],
                        smoke=old.smoke if old else None, imatrix=old.imatrix if old else None,
                        card=old.card if old else None)
    outcome.result = manifest
    fingerprint = src.fingerprint()
    settings = ArtifactSettings(outtype=outtype)
    if up_to_date(out, manifest.artifact(outtype.upper()), fingerprint, settings):
        outcome.kept.append(base)
    else:
        status(f"converting {model.architecture} ({model.n_params / 1e6:.1f}M parameters) to {base}")
        convert(model, out / base, outtype, out / "logs" / f"convert-{outtype}.log", name,
                recorder(out, out / base, manifest, [], outtype.upper(), "convert", fingerprint, settings))
        outcome.made.append(base)
    converted = manifest.artifact(outtype.upper())
    assert converted is not None  # kept, or recorded before it took its name
    outcome.notes += _drop_stale(out, manifest, converted)
    if dense_note and manifest.probe and not manifest.probe.is_moe:
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


def check_disk_for_download(snap: RepoSnapshot, out: Path, plan: QuantPlan) -> None:
    """Before any byte moves: room for what is not cached yet, and for the outputs."""
    weights = sum(f.size for f in snap.files if f.path.endswith(".safetensors"))
    n_params = weights // 2  # Hub checkpoints are bf16/f16; read_source counts exactly later
    outputs = sum(size for name, size in plan.sizes(n_params).items() if not (out / name).is_file())  # there: made
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    fetching = missing_bytes(snap)
    if os.stat(cache).st_dev == os.stat(out).st_dev:
        check_free_space(out, fetching + outputs, f"the download ({snap.repo_id}) and the GGUF outputs")
    else:
        check_free_space(cache, fetching, f"the download of {snap.repo_id}")
        check_free_space(out, outputs, "the GGUF outputs")
