"""What a probe of a GGUF reports: its expert layout, and what each placement moves (ggufio/probe.py reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import TypeAdapter

from moeprep.placement import Placement


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
    expert_bytes: int = 0


@dataclass
class Offload:
    """What one placement moves to the CPU, and what stays on the GPU."""

    name: Placement
    tensors_moved: int
    bytes_moved: int
    bytes_on_gpu: int  # with every layer offloaded; token_embd stays in host memory

    @property
    def patterns(self) -> list[str]:
        return self.name.patterns


@dataclass
class Attention:
    """What the KV cache's size follows from (per-layer arrays reduced to their largest value)."""

    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    kv_lora_rank: int | None = None  # MLA (deepseek2): a compressed latent cache
    rope_dimension_count: int | None = None
    sliding_window: int | None = None


@dataclass
class ChatFormat:
    """How the model is prompted, as its GGUF says: the chat template llama.cpp applies, and the special tokens. The
    text is the model's: data, shown escaped."""

    template: str | None = None  # tokenizer.chat_template; None: the GGUF carries none
    template_truncated: bool = False  # longer than moeprep keeps (MAX_CHAT_TEMPLATE): the GGUF holds the whole
    bos: str | None = None  # the tokens' text, from tokenizer.ggml.tokens
    eos: str | None = None
    eot: str | None = None
    add_bos: bool | None = None


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
    placements: list[Offload]
    attention: Attention = field(default_factory=Attention)  # absent from format 1 manifests: all None
    types: dict[str, dict[str, int]] = field(default_factory=dict)  # tensor class -> {ggml type: tensors}
    chat: ChatFormat | None = None  # None: probed before moeprep read it

    @property
    def is_moe(self) -> bool:
        return self.layout != "dense"

    def expert_tensor_names(self) -> list[str]:
        return [t.name for layer in self.layers for t in layer.experts]

    def placement(self, name: str) -> Offload | None:
        return next((p for p in self.placements if p.name == name), None)

    def to_dict(self) -> dict:
        return TypeAdapter(ProbeReport).dump_python(self, mode="json")
