"""The smoke stage's records: what was measured, how, on what, as typed data.

They are stored in the manifest under `smoke` and read by the card, plan and release; a figure is
always a Statistic (mean, sd, N and the values), and `Statistic.text` is the one way it is shown.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated

from pydantic import BeforeValidator

from moeprep.placement import CPU_MOE, GPU, Placement

NOT_MEASURED = "not measured"


class FlashAttn(StrEnum):
    """Flash attention as llama-server's --flash-attn takes it. llama.cpp's own log spells on and off as
    enabled and disabled (llama_flash_attn_type_name); `parse` reads either spelling."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def parse(cls, text: str | FlashAttn) -> FlashAttn:
        return cls({"enabled": "on", "disabled": "off"}.get(str(text), str(text)))


# How records hold it: either spelling is read (manifests written before it was typed hold llama.cpp's), one written.
FlashAttnField = Annotated[FlashAttn, BeforeValidator(FlashAttn.parse)]


@dataclass
class Statistic:
    mean: float | None = None
    sd: float | None = None
    n: int = 0
    values: list[float | None] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float | None]) -> Statistic:
        clean = [v for v in values if v is not None and math.isfinite(v)]
        if not clean:
            return cls(None, None, 0, list(values))
        return cls(statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0, len(clean), list[float | None](clean))

    @property
    def measured(self) -> bool:
        return self.mean is not None

    def text(self, digits: int = 1, with_n: bool = False) -> str:
        """`mean ± sd` (and N), or "not measured"."""
        if self.mean is None:
            return NOT_MEASURED
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}" + (f" (N={self.n})" if with_n else "")


def text(stat: Statistic | None, digits: int = 1, with_n: bool = False) -> str:
    return stat.text(digits, with_n) if stat else NOT_MEASURED


@dataclass
class Override:
    tensor: str
    type: str
    buffer_type: str  # CPU, CPU_REPACK, CUDA_Host, ...


@dataclass
class Buffer:
    device: str  # CPU, CUDA0, CUDA_Host, CPU_Mapped, ...
    kind: str  # model, KV, compute, output
    mib: float
    source: str  # the llama.cpp function that logged it (load_tensors, llama_kv_cache, ...)

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("CPU") and not self.device.endswith("_Host")


@dataclass
class Vram:
    """NVML's readings: this process's own (per-process accounting) and, as a fallback, the whole device's."""

    method: str
    before_load: Statistic  # device-wide
    after_load: Statistic  # device-wide
    peak_generation: Statistic  # device-wide: every process's memory, CUDA contexts included
    process_after_load: Statistic = field(default_factory=Statistic)
    process_peak: Statistic = field(default_factory=Statistic)  # this process alone, during generation


@dataclass
class Tokens:
    prompt: int
    generated: list[int]


@dataclass
class PlacementResult:
    placement: Placement
    patterns: list[str]
    overridden: list[Override]
    overrides_match_probe: bool
    buffers: list[Buffer]
    runs: int
    warmup_runs: int
    load_s: Statistic
    ttft_s: Statistic
    decode_tps: Statistic
    decode_tps_llama: Statistic
    prompt_tps: Statistic
    tokens: Tokens
    greedy_tokens: list[int]
    vram_mib: Vram | None
    failures: list[str] = field(default_factory=list)
    runtime: Runtime | None = None
    greedy_text: str | None = None  # the greedy tokens as text, for the card's sample output
    prompt_tps_llama: Statistic = field(default_factory=Statistic)  # llama.cpp's counter beside the wall clock

    def gpu_mib(self) -> float | None:
        """What the placement needs on the GPU as llama.cpp allocates it: model + KV + compute buffers (MiB)."""
        parts = self.gpu_bytes()
        return sum(parts.values()) / 2**20 if parts else None

    def overhead_mib(self) -> float | None:
        """The process's own peak beyond llama.cpp's buffers: the CUDA context and runtime."""
        own, buffers = (self.vram_mib.process_peak.mean if self.vram_mib else None), self.gpu_mib()
        return own - buffers if own is not None and buffers is not None else None

    def gpu_bytes(self) -> dict[str, float]:
        """Bytes of llama.cpp's model, KV and compute buffers on GPU devices (not host-pinned memory)."""
        on_gpu = [b for b in self.buffers if b.on_gpu]
        if not on_gpu:
            return {}
        return {kind: sum(b.mib for b in on_gpu if b.kind == kind) * 2**20 for kind in ("model", "KV", "compute")}


@dataclass
class Quality:
    """A file's next-token distributions against the F16's over the evaluation text, scored as llama-perplexity
    --kl-divergence scores them: the second half of each chunk of `ctx` tokens.

    Records made before chunked evaluation (384 positions of one fixed text) have only the KLD figures,
    top-1 and positions: every other field is None there.
    """

    reference: str
    reference_sha256: str | None
    text_sha256: str
    finite: bool
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None  # llama-perplexity's "Same top p"
    positions: int | None = None  # positions scored: chunks * (ctx - 1 - ctx/2)
    text: str | None = None  # the evaluation text, by name
    text_tokens: int | None = None  # its length in the model's tokens, BOS included
    ctx: int | None = None  # tokens per chunk
    chunks: int | None = None  # chunks scored
    n_seq: int | None = None  # chunks decoded together, one sequence each (llama-perplexity's n_seq)
    n_batch: int | None = None
    n_ubatch: int | None = None
    ppl: float | None = None  # this file's perplexity over the scored positions
    ppl_se: float | None = None
    ppl_reference: float | None = None  # the F16's, over the same positions
    ppl_reference_se: float | None = None
    kld_se: float | None = None  # standard error of kld_mean
    kld_p999: float | None = None
    top1_se: float | None = None
    rms_dp: float | None = None  # RMS of the change in the next token's probability (llama-perplexity's "RMS Δp")
    rms_dp_se: float | None = None

    @property
    def chunked(self) -> bool:
        """Measured as llama-perplexity measures (not the earlier 384 positions of a fixed text)."""
        return self.ctx is not None


@dataclass
class GreedyAgreement:
    between: list[str]
    positions: int
    agreement: float | None
    identical: bool
    first_difference: int | None


@dataclass
class FileResult:
    path: str
    quant: str | None
    sha256: str | None
    placements: dict[str, PlacementResult] = field(default_factory=dict)
    quality: Quality | None = None
    greedy_agreement: GreedyAgreement | None = None
    failures: list[str] = field(default_factory=list)
    ok: bool = True


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_total_mib: float
    memory_used_mib: float
    driver: str
    cuda: str


@dataclass
class Hardware:
    cpu: str
    cpu_cores: int | None  # logical CPUs
    ram_gib: float | None
    gpus: list[GpuInfo]
    os: str
    physical_cores: int | None = None

    def machine(self) -> tuple:
        """The kind of machine, without what changes from one reading to the next (the GPU's memory in use):
        two measurements on equal machines may stand in one table."""
        return (self.cpu, self.physical_cores, tuple((g.name, g.memory_total_mib, g.driver, g.cuda) for g in self.gpus))


@dataclass
class Runtime:
    """What llama.cpp ran with, as its load log states it: the settings that shape every figure."""

    threads: int
    threads_batch: int
    n_ctx: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    flash_attn: FlashAttnField | None = None  # the setting llama.cpp logged
    flash_attn_used: bool | None = None  # what ran: `auto` as llama.cpp resolved it, on and off as asked
    n_seq_max: int | None = None  # sequences the context holds (llama-server: 4 slots)
    kv_unified: bool | None = None

    def __post_init__(self) -> None:  # llama.cpp's log spells it enabled/disabled: one spelling from here on
        if self.flash_attn is not None:
            self.flash_attn = FlashAttn.parse(self.flash_attn)

    @property
    def flash_attn_ran(self) -> FlashAttn | None:
        """On or off as it ran: `auto` as llama.cpp resolved it (None where that was not logged), on and off as asked."""
        if self.flash_attn_used is not None:
            return FlashAttn.ON if self.flash_attn_used else FlashAttn.OFF
        return self.flash_attn if self.flash_attn is not FlashAttn.AUTO else None

    def text(self) -> str:
        asked = self.flash_attn
        ran = self.flash_attn_ran
        if asked is FlashAttn.AUTO:
            fa = f"auto, which llama.cpp resolved to {ran}" if ran else "auto (its resolution was not logged)"
        else:
            fa = str(asked or "?")
        slots = f", {self.n_seq_max} sequences" if self.n_seq_max else ""
        slots += " in a unified KV cache" if self.kv_unified else ""
        return (f"threads {self.threads} (batch {self.threads_batch}), flash attention {fa}, n_ctx {self.n_ctx}, "
                f"n_batch {self.n_batch}, n_ubatch {self.n_ubatch}{slots}")


@dataclass
class SmokeSettings:
    """What a smoke asks for. Defaults are llama-server's: threads = physical cores, flash attention
    auto, n_batch 2048, n_ubatch 512; the context is small, since a smoke test is short. Quality is
    measured with llama-perplexity's chunking of quality_ctx and its n_batch rules (quality.chunking)."""

    runs: int = 3
    ctx: int = 512
    new_tokens: int = 32
    threads: int | None = None  # None: llama.cpp's default, one per physical core
    flash_attn: FlashAttnField = FlashAttn.AUTO
    n_batch: int = 2048
    n_ubatch: int = 512
    prompt: str = "A mixture of experts routes every token to a few of many feed-forward networks, so"
    warmup_runs: int = 1
    quality_text: str = "eval-en.txt"  # the evaluation text, by name (moeprep's own unless --quality-text)
    quality_text_sha256: str = ""
    quality_ctx: int = 512  # tokens per chunk, llama-perplexity's -c
    quality_chunks: int = 0  # chunks scored; 0: every whole chunk of the text
    placements: list[Placement] = field(default_factory=lambda: [GPU, CPU_MOE])
    sweep: bool = False  # the offload curve: gpu, a spread of n-cpu-moe=N and cpu-moe, resolved per model

    def __post_init__(self) -> None:  # as given on a command line or in a recipe: parsed once, here
        self.flash_attn = FlashAttn.parse(self.flash_attn)
        self.placements = [Placement(p) for p in self.placements]

    def request_key(self) -> tuple:
        """What a smoke was asked to measure. Threads are left out: they follow the runner (one per physical core),
        and the machine is compared on its own (Hardware.machine)."""
        return (self.runs, self.ctx, self.new_tokens, FlashAttn.parse(self.flash_attn), self.n_batch, self.n_ubatch,
                self.prompt, self.warmup_runs, self.sweep, () if self.sweep else tuple(self.placements))

    def quality_key(self) -> tuple:
        """What decides a quality figure: the text by its bytes, its chunking and batches, and the greedy prompt."""
        return (self.quality_text_sha256, self.quality_ctx, self.quality_chunks, self.n_batch, self.n_ubatch,
                self.prompt, self.new_tokens)

    def key(self) -> tuple:
        """Everything that shapes a local smoke's figures: the request, the quality method and the threads."""
        return (*self.request_key(), *self.quality_key(), self.threads)


@dataclass
class SmokeReport:
    measured_at: str
    backend: str
    nvml: str
    hardware: Hardware
    tools: dict[str, str | bool | None]
    settings: SmokeSettings
    methods: dict[str, str]
    artifacts: dict[str, FileResult] = field(default_factory=dict)

    def failed(self) -> dict[str, list[str]]:
        return {name: r.failures for name, r in self.artifacts.items() if not r.ok}

    def machine(self) -> tuple:
        """What the figures were measured on: the backend and the kind of machine (see Hardware.machine)."""
        return (self.backend, *self.hardware.machine())

    def merged_into(self, old: SmokeReport | None) -> SmokeReport:
        """A smoke of one file updates that file's entry and keeps the others' (measured the same way)."""
        if old is None or old.settings.key() != self.settings.key() or old.machine() != self.machine():
            return self
        return SmokeReport(**{**vars(self), "artifacts": {**old.artifacts, **self.artifacts}})


@dataclass
class Simulation:
    """One context llama.cpp sized with nothing allocated (model param no_alloc), as it logged it."""

    device: str  # whose compute buffer stands for the GPU's: "CUDA0", ..., or "CPU" on a build without a GPU
    placement: Placement | None  # simulated with this placement's overrides; None: one run for every placement
    flash_attn: FlashAttn  # on or off, as llama.cpp applied it
    n_ctx: int  # as llama.cpp applied them (n_ctx rounded up, n_batch and n_ubatch clamped)
    n_batch: int
    n_ubatch: int
    compute: int  # bytes of the compute buffer on `device`
    buffers: list[Buffer] = field(default_factory=list)  # every compute buffer logged, host ones included
    seconds: float = 0.0
    kv: int = 0  # bytes of every KV cache and recurrent state, as llama.cpp sized them
    kv_method: str = ""  # llama.cpp's own lines for them
    asked: FlashAttn | None = None  # what the context was asked for; `auto` is resolved in `flash_attn`


@dataclass
class PlanRecord:
    """llama.cpp's sizings of one file's context at one size, as `plan` made them where the file was: everything
    a plan and the tier table are computed from, so a card can show them without the GGUF."""

    ctx: int  # as asked
    n_batch: int
    n_ubatch: int
    cache_type: str  # the K and V cache type sized (f16 unless chosen)
    llama_cpp: str | None  # the commit of the llama.cpp that sized them
    backend: str  # the device llama.cpp sized for: CPU (a CUDA build is predicted) or CUDA0, ...
    simulations: list[Simulation] = field(default_factory=list)
    why_not: str | None = None  # set where llama.cpp could not size it (a layout it cannot load)
