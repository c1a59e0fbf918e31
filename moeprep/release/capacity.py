"""Capacity: what each job of a staged release moves, stores and takes, estimated from the recipe.

Every figure here is an estimate, and says from what: the source size the recipe states (`source.size`,
the Hub's listed total), bits per weight per quant type (quants.planned_size, with its 10 % margin, via the recipe's QuantPlan), and
throughputs. The CPU throughputs were measured by `scripts/bench-throughput` on the machine named in
MEASURED_ON; network rates are assumptions, named as such. GPU work is not estimated: no figure for it was
measured on the runners this plan is for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moeprep.release.recipe import Recipe
from moeprep.release.staging import smoked_labels

# scripts/bench-throughput on 2026-11-26: "Intel(R) Xeon(R) Processor", 2 physical cores, shared with a compile and
# other tests (load average 6.5), so these are slow; NOTES.md's unloaded figures on the same kind of machine are
# 3-5x faster (Q4_K_M 48 MB/s). Rates: F16 GGUF bytes per second, fitted over a 27 MB and a 410 MB model.
MEASURED_ON = "a 2-core Intel Xeon under load (scripts/bench-throughput, README's capacity plan)"
CONVERT_BPS = 16.8e6  # F16 bytes written per second
CONVERT_FIXED_S = 17.0  # the converter importing torch and transformers, under that load
QUANTIZE_BPS = {"Q8_0": 65e6, "Q4_K_M": 9.8e6, "Q2_K": 17.9e6}  # F16 bytes read per second
QUANTIZE_OTHER_BPS = 9.8e6  # other types: as slow as the slowest K-quant measured (an estimate)
EVAL_FLOPS = 6.4e9  # quality eval: 2 x active parameters x tokens evaluated per second, F16, 28.7 M active
EVAL_TEXT_TOKENS = 12_000  # moeprep's evaluation text (49 KB) at about 4 bytes per token: an estimate
QUALITY_CTX = 512  # tokens per chunk
SHA256_BPS = 0.68e9  # hashlib, measured under the same load (NOTES: 1.4 GB/s unloaded)
CORES_MEASURED = 2

# Assumptions, not measurements: a GitHub-hosted or cloud runner's sustained Hub throughput.
DOWNLOAD_BPS = 100e6
UPLOAD_BPS = 50e6
HOSTED_FREE_DISK = 14e9  # a GitHub-hosted ubuntu-latest runner's free disk (GitHub's documentation)
PREPARE_CORES = 16  # the large-disk self-hosted CPU runner this plan assumes; rates scale with cores below
HEADER_BYTES = 16e6  # a GGUF's header (metadata, tokenizer, tensor infos): a few MB; 16 MB bounds it


@dataclass
class Job:
    group: str
    quant: str | None
    download_bytes: int | None
    upload_bytes: int | None
    disk_bytes: int | None
    minutes: float | None  # None: not estimated (GPU work)
    runs_on: str | list[str]
    basis: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # minutes per stage, where estimated

    def to_dict(self) -> dict:
        return asdict(self)


def files(r: Recipe) -> dict[str, int] | None:
    """Estimated bytes of every file prepare makes, from the source size; None when the recipe states none."""
    size = r.source.size_bytes
    if size is None:
        return None
    plan = r.quant_plan
    by_file = plan.sizes(size // 2)  # a 16-bit source: the F16/BF16 GGUF is about as large
    return {r.outtype.upper(): by_file[plan.base], **{t.label: by_file[plan.path(t)] for t in plan.targets}}


def active_params(r: Recipe) -> float:
    """Parameters used per token, estimated as 10 % dense (attention, embeddings) and 90 % routed experts."""
    n = (r.source.size_bytes or 0) / 2
    e = r.expect
    share = e.expert_used_count / e.expert_count if e.expert_count and e.expert_used_count else 1.0
    return n * (0.1 + 0.9 * share)


def eval_tokens(r: Recipe) -> int:
    chunks = r.smoke.quality_chunks
    return min(EVAL_TEXT_TOKENS, chunks * QUALITY_CTX) if chunks else EVAL_TEXT_TOKENS


def jobs(r: Recipe) -> list[Job]:
    sizes = files(r)
    basis = [f"source {r.source.size or 'size not stated in the recipe'}; quant sizes from bits per weight + 10 %"]
    if sizes is None:
        return ([Job("prepare", None, None, None, None, None, ["self-hosted", "cpu", "large-disk"], basis)]
                + [Job("smoke", q, None, 0, None, None, ["self-hosted", "gpu"], basis) for q in smoked_labels(r)]
                + [Job("publish", None, None, 0, None, None, "ubuntu-latest", basis)])
    source = r.source.size_bytes or 0  # sizes are known only where the source size is
    f16 = sizes[r.outtype.upper()]
    made = sum(sizes.values())
    split = sum(v for v in sizes.values() if v > r.hub.max_shard_bytes)  # shards are a second copy on disk
    disk = int((source + made + split) * 1.1)
    scale = PREPARE_CORES / CORES_MEASURED if disk > HOSTED_FREE_DISK else 1.0  # hosted runners: 2-4 cores
    parts = {
        "download": source / DOWNLOAD_BPS,
        "convert": CONVERT_FIXED_S + f16 / (CONVERT_BPS * scale),
        "quantize": sum(f16 / (QUANTIZE_BPS.get(q, QUANTIZE_OTHER_BPS) * scale) for q in sizes if q != r.outtype.upper()),
        "quality": len(sizes) * 2 * active_params(r) * eval_tokens(r) / (EVAL_FLOPS * scale),  # F16 and each quant
        "hash and split": (made + split) / SHA256_BPS,
        "stage (upload)": made / UPLOAD_BPS,
    }
    seconds = sum(parts.values())
    prepare_on = "ubuntu-latest" if disk <= HOSTED_FREE_DISK else ["self-hosted", "cpu", "large-disk"]
    out = [Job("prepare", None, source, made, disk, round(seconds / 60, 1), prepare_on, basis + [
        f"download {DOWNLOAD_BPS / 1e6:.0f} MB/s and upload {UPLOAD_BPS / 1e6:.0f} MB/s assumed",
        f"convert, quantize and quality eval at the rates measured on {MEASURED_ON}; quality: "
        f"{eval_tokens(r)} tokens per file, active parameters as 10 % dense + 90 % experts x used/count"
        + (f", scaled to {PREPARE_CORES} cores" if scale > 1 else "")], {k: round(v / 60, 1) for k, v in parts.items()})]
    for q in smoked_labels(r):
        out.append(Job("smoke", q, sizes[q], 0, int(sizes[q] * 1.1), None, ["self-hosted", "gpu"], basis + [
            "minutes not estimated: GPU load and decode time were not measured on the smoke runners; "
            f"the download alone takes about {sizes[q] / DOWNLOAD_BPS / 60:.0f} min at {DOWNLOAD_BPS / 1e6:.0f} MB/s"]))
    headers = int(HEADER_BYTES * len(sizes))
    out.append(Job("publish", None, headers, headers // 8, headers + 10**9, round(5 + headers / DOWNLOAD_BPS / 60, 1),
                   "ubuntu-latest", basis + ["the headers, manifest and results only; promotion copies on the Hub; "
                                             "5 min allowed for setup and the card's plan"]))
    return out
