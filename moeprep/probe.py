"""Probe a GGUF's expert layout with gguf-py: what `--cpu-moe` and `--n-cpu-moe N` would move.

The reader memory-maps the file, so probing an 80 GB GGUF reads only its header.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import IntegrityError, MoeprepError

# llama.cpp's --cpu-moe override (common/arg.cpp); searched anywhere in the name, so `.bias` matches too.
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_EXPERT = re.compile(CPU_MOE_PATTERN)
_SHARED = re.compile(r"_shexp\b")
_ROUTER = re.compile(r"\.(ffn_gate_inp|exp_probs_b)\.")
_LEGACY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def n_cpu_moe_patterns(n: int) -> list[str]:
    """llama.cpp's --n-cpu-moe N: one pattern per block 0..N-1, leading dense blocks included."""
    return [rf"blk\.{i}{CPU_MOE_PATTERN}" for i in range(n)]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: list[int]
    bytes: int


@dataclass
class LayerExperts:
    block: int
    experts: list[TensorInfo] = field(default_factory=list)
    shared: list[TensorInfo] = field(default_factory=list)
    router: list[TensorInfo] = field(default_factory=list)

    @property
    def expert_bytes(self) -> int:
        return sum(t.bytes for t in self.experts)


@dataclass
class Placement:
    """What one override setting moves to the CPU, and what stays on the GPU."""

    name: str  # "gpu", "cpu-moe", "n-cpu-moe=N"
    patterns: list[str]
    tensors_moved: int
    bytes_moved: int
    bytes_on_gpu: int  # with every layer offloaded; token_embd stays in host memory


@dataclass
class ProbeReport:
    file: str
    architecture: str
    file_type: str | None
    block_count: int
    expert_count: int
    expert_used_count: int
    expert_shared_count: int
    leading_dense_block_count: int
    context_length: int | None
    embedding_length: int | None
    n_params: int
    layout: str  # "merged", "legacy-per-expert" or "dense"
    loadable: bool
    notes: list[str]
    bytes: dict[str, int]
    layers: list[LayerExperts]
    placements: list[Placement]

    @property
    def is_moe(self) -> bool:
        return self.layout != "dense"

    def expert_tensor_names(self) -> list[str]:
        return [t.name for layer in self.layers for t in layer.experts]

    def to_dict(self) -> dict:
        data = asdict(self)
        for layer, raw in zip(self.layers, data["layers"]):
            raw["expert_bytes"] = layer.expert_bytes
        return data


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _read(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise MoeprepError(f"{path} does not exist", "give the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise IntegrityError(f"{path} is not a GGUF file (no GGUF magic at its start)", "give the path of a .gguf file")
    retry = "rerun the stage that wrote it, or download it again"
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, struct or numpy errors on short or bad bytes
        raise IntegrityError(f"{path} is truncated or damaged ({e})", retry) from e
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    size = path.stat().st_size
    if end > size:
        raise IntegrityError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}", retry)
    return reader


def probe(path: Path, n_values: list[int] | None = None) -> ProbeReport:
    """Read `path` and report its expert layout and the offload placements.

    `n_values` picks which --n-cpu-moe N to evaluate (default: every N from 1 to block_count).
    """
    from gguf import LlamaFileType

    path = Path(path)
    reader = _read(path)
    arch = str(_field(reader, "general.architecture", "unknown"))

    def key(name: str, default=0):
        value = _field(reader, f"{arch}.{name}", default)
        return int(value) if value is not None else None

    tensors = [
        TensorInfo(t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes))
        for t in reader.tensors
    ]
    layers: dict[int, LayerExperts] = {}
    legacy: set[int] = set()
    sums = {"expert": 0, "shared_expert": 0, "router": 0, "other": 0}
    for t in tensors:
        block = _BLOCK.match(t.name)
        kind = "other"
        if _EXPERT.search(t.name):
            kind = "expert"
        elif _SHARED.search(t.name):
            kind = "shared_expert"
        elif _ROUTER.search(t.name):
            kind = "router"
        elif m := _LEGACY.match(t.name):
            legacy.add(int(m.group(1)))
            kind = "expert"
        sums[kind] += t.bytes
        if block and kind != "other":
            layer = layers.setdefault(int(block.group(1)), LayerExperts(int(block.group(1))))
            {"expert": layer.experts, "shared_expert": layer.shared, "router": layer.router}[kind].append(t)
    sums["total"] = sum(t.bytes for t in tensors)
    sums["input_layer"] = sum(t.bytes for t in tensors if t.name.startswith("token_embd."))

    block_count = key("block_count")
    expert_count = key("expert_count")
    notes: list[str] = []
    loadable = True
    if legacy:
        layout = "legacy-per-expert"
        loadable = False
        notes.append(
            "one tensor per expert (blk.N.ffn_gate.E.weight): current llama.cpp cannot load this layout; "
            "convert again from the safetensors"
        )
    elif sums["expert"] or expert_count:
        layout = "merged"
    else:
        layout = "dense"
        notes.append("dense model: no expert tensors, so --cpu-moe and --n-cpu-moe would change nothing")
    if sums["shared_expert"]:
        notes.append("shared experts (_shexp) and routers stay on the GPU under --cpu-moe")
    if any("gate_up_exps" in t.name for t in tensors):
        notes.append("gate and up experts are fused (ffn_gate_up_exps)")

    file_type = _field(reader, "general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)

    report = ProbeReport(
        file=path.name,
        architecture=arch,
        file_type=file_type_name,
        block_count=block_count,
        expert_count=expert_count,
        expert_used_count=key("expert_used_count"),
        expert_shared_count=key("expert_shared_count"),
        leading_dense_block_count=key("leading_dense_block_count"),
        context_length=key("context_length", None),
        embedding_length=key("embedding_length", None),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        layout=layout,
        loadable=loadable,
        notes=notes,
        bytes=sums,
        layers=[layers[b] for b in sorted(layers)],
        placements=[],
    )
    if n_values is None:
        n_values = list(range(1, block_count + 1)) if report.is_moe else []
    report.placements = placements(tensors, n_values) if report.is_moe else [_place(tensors, "gpu", [])]
    return report


def _place(tensors: list[TensorInfo], name: str, patterns: list[str]) -> Placement:
    compiled = [re.compile(p) for p in patterns]
    moved = [t for t in tensors if any(p.search(t.name) for p in compiled)]
    moved_bytes = sum(t.bytes for t in moved)
    # llama.cpp keeps the input layer (token_embd) in host memory whatever the offload
    names = {t.name for t in moved}
    on_gpu = sum(t.bytes for t in tensors if t.name not in names and not t.name.startswith("token_embd."))
    return Placement(name, patterns, len(moved), moved_bytes, on_gpu)


def placements(tensors: list[TensorInfo], n_values: list[int]) -> list[Placement]:
    out = [_place(tensors, "gpu", []), _place(tensors, "cpu-moe", [CPU_MOE_PATTERN])]
    out += [_place(tensors, f"n-cpu-moe={n}", n_cpu_moe_patterns(n)) for n in n_values]
    return out
