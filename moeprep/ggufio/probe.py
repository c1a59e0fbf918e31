"""Probe a GGUF's expert layout with gguf-py: what `--cpu-moe` and `--n-cpu-moe N` would move.

The reader memory-maps the file, so probing an 80 GB GGUF reads only its header.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGUFReader, LlamaFileType

from moeprep.errors import IntegrityError, MoeprepError
from moeprep.inputs import short
from moeprep.limits import MAX_CTX
from moeprep.placement import CPU_MOE, CPU_MOE_PATTERN, GPU, MAX_BLOCKS, Placement
from moeprep.records.probe import Attention, ChatFormat, LayerExperts, Offload, ProbeReport, TensorInfo

_EXPERT = re.compile(CPU_MOE_PATTERN)
_SHARED = re.compile(r"_shexp\b")
_ROUTER = re.compile(r"\.(ffn_gate_inp|exp_probs_b)\.")
_LEGACY = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (src/llama-hparams.h at 0c1e570): llama.cpp aborts above it


def tensor_class(name: str) -> str:
    """What a tensor is, for the per-class type summary (what a mix's rules aim at)."""
    if _EXPERT.search(name) or _LEGACY.match(name):
        return "experts"
    if _SHARED.search(name):
        return "shared experts"
    if _ROUTER.search(name):
        return "routers"
    if "_norm." in name:  # attn_norm, ffn_norm, output_norm: small, always F32
        return "norms and dense"
    if ".attn_" in name:
        return "attention"
    if name.startswith("token_embd."):
        return "embedding"
    if name.startswith("output."):
        return "output"
    return "norms and dense"


MAX_CHAT_TEMPLATE = 64 * 1024  # characters: the longest real templates (tool-calling ones) are about 20 K


def chat_format(reader) -> ChatFormat:
    """The chat template and special tokens the GGUF carries, as llama.cpp reads them (llama-vocab.cpp)."""
    template = value(reader, "tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0

    def text(key: str) -> str | None:
        token_id = value(reader, f"tokenizer.ggml.{key}_token_id")
        if tokens is None or isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            return None
        return str(tokens.contents(int(token_id)))[:100] if 0 <= token_id < n_tokens else None

    add_bos = value(reader, "tokenizer.ggml.add_bos_token")
    return ChatFormat(template[:MAX_CHAT_TEMPLATE] if template else None,
                      template is not None and len(template) > MAX_CHAT_TEMPLATE, text("bos"), text("eos"), text("eot"),
                      add_bos if isinstance(add_bos, bool) else None)


def type_summary(tensors: list[TensorInfo]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in tensors:
        by_type = out.setdefault(tensor_class(t.name), {})
        by_type[t.type] = by_type.get(t.type, 0) + 1
    return out


def read(path: Path):
    """gguf-py's reader over `path`, after checking it is a whole GGUF; one clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        raise MoeprepError(f"{path} is a directory", "give the path of a .gguf file in it")
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


def value(reader, key: str, default=None):
    """A metadata value through gguf-py's public API; per-layer arrays become their largest element."""
    f = reader.get_field(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, list):
        return max(v) if v else default
    return v


def probe(path: Path, n_values: list[int] | None = None) -> ProbeReport:
    """Read `path` and report its expert layout and the offload placements.

    `n_values` picks which --n-cpu-moe N to evaluate (default: every N from 1 to block_count).
    """
    path = Path(path)
    reader = read(path)
    arch = str(value(reader, "general.architecture", "unknown"))

    def key(name: str, default=0):
        v = value(reader, f"{arch}.{name}", default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):  # a count the header gives as text or a float
            raise IntegrityError(f"{path} gives {arch}.{name} as {short(v)}, not a count",
                                 "rerun the stage that wrote it, or download it again")
        return int(v)

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
    for layer in layers.values():
        layer.expert_bytes = sum(t.bytes for t in layer.experts)
    sums["total"] = sum(t.bytes for t in tensors)
    sums["input_layer"] = sum(t.bytes for t in tensors if t.name.startswith("token_embd."))

    block_count = key("block_count")
    expert_count = key("expert_count")
    # Counts from the header size what follows (a placement per block, a row per expert): a file that claims more
    # than any model has, or more blocks than its tensors have, is damaged or crafted, and is refused here.
    blocks_seen = max((int(m.group(1)) + 1 for t in tensors if (m := _BLOCK.match(t.name))), default=0)
    if not 0 <= (block_count or 0) <= MAX_BLOCKS or (block_count or 0) > max(blocks_seen, 1) * 2:
        raise IntegrityError(f"{path} claims {block_count} blocks and has tensors for {blocks_seen}",
                             "rerun the stage that wrote it, or download it again")
    if not 0 <= (expert_count or 0) <= MAX_EXPERTS:
        raise IntegrityError(f"{path} claims {expert_count} experts; no model has over {MAX_EXPERTS}",
                             "rerun the stage that wrote it, or download it again")
    # What llama.cpp asserts as it loads (src/llama-model.cpp): a file that breaks it would abort the process.
    used = key("expert_used_count")
    if expert_count and not 1 <= (used or 0) <= expert_count:
        raise IntegrityError(f"{path} routes each token to {used} of its {expert_count} experts, which llama.cpp "
                             "refuses", "rerun the stage that wrote it, or download it again")
    heads = key("attention.head_count", None)
    if heads == 0 and any(".attn_q." in t.name or ".attn_qkv." in t.name for t in tensors):
        raise IntegrityError(f"{path} has attention tensors and 0 attention heads", "rerun the stage that wrote it, "
                             "or download it again")
    trained = key("context_length", None)
    if trained is not None and not 0 <= trained <= MAX_CTX:
        raise IntegrityError(f"{path} claims a trained context of {trained} tokens; moeprep plans at most {MAX_CTX}",
                             "rerun the stage that wrote it, or download it again")
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

    file_type = value(reader, "general.file_type")
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
        expert_used_count=used,
        expert_shared_count=key("expert_shared_count"),
        leading_dense_block_count=key("leading_dense_block_count"),
        context_length=trained,
        embedding_length=key("embedding_length", None),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        layout=layout,
        loadable=loadable,
        notes=notes,
        bytes=sums,
        attention=Attention(**{name: key(f"attention.{name}", None) for name in (
            "head_count", "head_count_kv", "key_length", "value_length", "kv_lora_rank", "sliding_window")},
            rope_dimension_count=key("rope.dimension_count", None)),
        layers=[layers[b] for b in sorted(layers)],
        placements=[],
        types=type_summary(tensors),
    )
    report.chat = chat_format(reader)
    if n_values is None:
        n_values = list(range(1, block_count + 1)) if report.is_moe else []
    report.placements = placements(tensors, n_values) if report.is_moe else [_place(tensors, GPU)]
    return report


def _place(tensors: list[TensorInfo], spec: Placement) -> Offload:
    compiled = [re.compile(p) for p in spec.patterns]
    moved = [t for t in tensors if any(p.search(t.name) for p in compiled)]
    names = {t.name for t in moved}
    # llama.cpp keeps the input layer (token_embd) in host memory whatever the offload
    on_gpu = sum(t.bytes for t in tensors if t.name not in names and not t.name.startswith("token_embd."))
    return Offload(spec, len(moved), sum(t.bytes for t in moved), on_gpu)


def placements(tensors: list[TensorInfo], n_values: list[int]) -> list[Offload]:
    """gpu, cpu-moe and n-cpu-moe=N for each N, in one pass over the tensors: --n-cpu-moe N moves exactly the
    --cpu-moe tensors of blocks 0..N-1 (its patterns are `blk\\.i` + --cpu-moe's), so each N is a running sum."""
    every = _place(tensors, CPU_MOE)
    out = [_place(tensors, GPU), every]
    if not n_values:
        return out
    total_on_gpu = out[0].bytes_on_gpu
    per_block: dict[int, tuple[int, int]] = {}
    for t in tensors:
        if (m := _BLOCK.match(t.name)) and _EXPERT.search(t.name):
            count, size = per_block.get(int(m.group(1)), (0, 0))
            per_block[int(m.group(1))] = (count + 1, size + t.bytes)
    moved_n = moved_b = 0
    for n in range(1, max(n_values) + 1):
        count, size = per_block.get(n - 1, (0, 0))
        moved_n, moved_b = moved_n + count, moved_b + size
        if n in n_values:
            out.append(Offload(Placement(f"n-cpu-moe={n}"), moved_n, moved_b, total_on_gpu - moved_b))
    return out


def expected_overrides(report: ProbeReport, spec: Placement) -> list[str]:
    """The expert tensors llama.cpp should report as overridden for a placement: what smoke checks."""
    compiled = [re.compile(p) for p in spec.patterns]
    return [t.name for layer in report.layers for t in layer.experts if any(c.search(t.name) for c in compiled)]
