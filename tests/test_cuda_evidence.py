"""The CUDA build users run, checked against what the H200 recorded (tests/evidence.py): flash attention as
CUDA resolves `auto`, llama.cpp's CUDA memory for every flash-attention setting, the tier table's cells as the
H200 loaded them, and the KV cache as llama.cpp sizes it.

On a CPU-only build these check moeprep's predictions for CUDA; on a CUDA build plan simulates on the GPU, so the
same rows check llama.cpp's own allocator, and only what the build resolves is compared.
"""

import json
import re
from pathlib import Path

import pytest

from moeprep.card import render as card
from moeprep.ggufio.probe import probe
from moeprep.llama.build import versions
from moeprep.llama.context import ContextParams
from moeprep.llama.sizing import simulate_context
from moeprep.predict import plan as plan_mod
from moeprep.predict.plan import cuda_flash_attn, kv_cache_bytes
from moeprep.records.manifest import Artifact, Manifest, Source
from moeprep.records.results import (
    FileResult,
    GpuInfo,
    Hardware,
    PlacementResult,
    SmokeReport,
    SmokeSettings,
    Statistic,
    Tokens,
)
from moeprep.stages import smoke
from moeprep.stages.plan import plan_file
from moeprep.stages.plan import tiers as table
from tests import ggufs
from tests.evidence import FA, FIT_FA, ROWS, evidence_gguf, load_log, ph32k

GPU_BUILD = bool(versions()["gpu_offload"])
MIB = 2**20


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return ph32k(tmp_path_factory.mktemp("ph32k"))


@pytest.fixture(scope="module")
def plans(files):
    """plan_file for every (quant, ctx, ubatch, flash attention) of fit-fa.txt, once."""
    out = {}
    for quant, ctx, ubatch, _, fa, *_ in FIT_FA:
        if (quant, ctx, ubatch, fa) not in out:
            out[quant, ctx, ubatch, fa] = plan_file(files[quant], ctx, ubatch=ubatch, flash_attn=fa)
    return out


def _error(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def test_evidence_copies_match_shared():
    shared = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "evidence-2026-12-04-h200-fa"
    if not shared.is_dir():
        pytest.skip(f"{shared} is not beside this checkout")
    assert (FA / "fit-fa.txt").read_text() == (shared / "fit-fa.txt").read_text()
    assert load_log("gpu-fa-auto") == (shared / "log-ph32k-Q4_K_M-gpu-fa-auto.txt").read_text()
    assert len(FIT_FA) == 72


def test_plan_predicts_every_fit_fa_row_within_10_percent(plans):
    """Issue 17: the predicted GPU total (weights + KV + compute) within 10 % of CUDA0's model + context + compute,
    for the flash attention each row names, `auto` as the CUDA build resolves it (on: head size 128)."""
    for quant, ctx, ubatch, placement, fa, model, kv, compute in FIT_FA:
        p = plans[quant, ctx, ubatch, fa]
        if GPU_BUILD and fa != "off" and p.flash_attn_used != "on":
            continue  # a CUDA build without flash-attention kernels does not run what these rows measured
        assert p.flash_attn_used == ("off" if fa == "off" else "on"), (fa, p.flash_attn_note)
        row = next(r for r in p.rows if r.placement == placement)
        assert row.weights_on_gpu / MIB == pytest.approx(model, abs=1) and row.kv_cache == kv * MIB
        total = _error(row.predicted_total / MIB, model + kv + compute)
        assert abs(total) < 10, (quant, ctx, ubatch, placement, fa, total)
        assert set(row.compute_by_flash_attn) == {"on", "off"}  # both figures, always


def test_plan_error_ranges_are_the_ones_the_method_states(plans, tmp_path):
    """EVIDENCE_ERRORS, which the card's method text quotes, recomputed over both H200 runs (96 settings)."""
    if GPU_BUILD:
        pytest.skip("on a CUDA build plan simulates on the GPU; the error ranges are those of the CPU-only prediction")
    errors = {"simulated": [], "staging": [], "total": []}

    def add(row, model, kv, compute):
        errors["total"].append(_error(row.predicted_total / MIB, model + kv + compute))
        kind = "staging" if "staging rule" in row.compute_method else "simulated"
        errors[kind].append(_error(row.compute / MIB, compute))

    for quant, ctx, ubatch, placement, fa, model, kv, compute in FIT_FA:
        add(next(r for r in plans[quant, ctx, ubatch, fa].rows if r.placement == placement), model, kv, compute)
    old = {q: evidence_gguf(tmp_path / f"phimoe-gpu-{q}.gguf", q) for q in ("F16", "Q4_K_M")}
    cache = {}
    for quant, ctx, ubatch, placement, model, kv, compute in ROWS:
        key = (quant, ctx, ubatch)
        cache[key] = cache.get(key) or plan_file(old[quant], ctx, ubatch=ubatch, flash_attn="off")
        add(next(r for r in cache[key].rows if r.placement == placement), model, kv, compute)
    assert sum(map(len, errors.values())) == 2 * (72 + 24)
    for name, values in errors.items():
        assert (round(min(values), 1), round(max(values), 1)) == plan_mod.EVIDENCE_ERRORS[name], name


def test_plan_resolves_auto_as_cuda_does(files):
    report = probe(files["Q4_K_M"])
    assert cuda_flash_attn(report)[0] and "128/128" in cuda_flash_attn(report)[1]
    assert not cuda_flash_attn(report, "q4_K", "q4_K")[0]  # no kernel for a K-quant cache
    # head sizes without a CUDA kernel resolve off; MLA's 576/512 has one (with a GQA ratio of 2 or more)
    shaped = probe(files["Q4_K_M"])
    shaped.attention.key_length = shaped.attention.value_length = 48
    assert cuda_flash_attn(shaped) == (False, cuda_flash_attn(shaped)[1]) and "48/48" in cuda_flash_attn(shaped)[1]
    shaped.attention.kv_lora_rank, shaped.attention.rope_dimension_count = 512, 64
    assert cuda_flash_attn(shaped)[0] and "576/512" in cuda_flash_attn(shaped)[1]


def test_tier_table_puts_131072_on_the_gpu_at_4_gib_as_the_h200_loaded_it(files):
    """serve.txt: with only 4 GiB free, the Q4_K_M loaded and generated at ctx 131072 fully on the GPU. A table
    that sized `auto` as flash attention off said it did not fit."""
    t = table(files["Q4_K_M"], tiers_gib=[2, 4])
    assert t.contexts == [4096, 16384, 32768, 131072]  # the file's trained context, without a manifest
    cell = next(c for tier in t.tiers if (tier.gib, tier.ctx) == (4, 131072) for c in tier.cells)
    assert cell.placement == "gpu" and cell.command.endswith("--ctx-size 131072 --flash-attn auto --fit off")
    served = re.search(r"t4-c131072-nofit-gpu: loaded=yes generated 8 .*?free MiB after (\d+) (.*)",
                       (FA / "serve.txt").read_text())
    buffers = sum(float(m) for dev, kind, m in re.findall(r"\('(\w+)', '(\w+)', ([\d.]+)\)", served.group(2))
                  if dev == "CUDA0")
    assert abs(_error(cell.gpu_bytes / MIB, buffers)) < 10  # what CUDA allocated on that load
    assert cell.gpu_bytes + t.headroom_mib * MIB <= 4 * 2**30


@pytest.mark.parametrize("placement", ["gpu", "cpu-moe"])
@pytest.mark.parametrize("fa, used", [("auto", True), ("on", True), ("off", False)])
def test_cuda_load_logs_parse_to_the_flash_attention_that_ran(placement, fa, used):
    """The six raw CUDA load logs: `auto` resolved by resolve_fused_ops ("Flash Attention enabled"); with on or
    off nothing is resolved and what was asked is what ran."""
    log = smoke.parse_log(load_log(f"{placement}-fa-{fa}"))
    assert log.flash_attn_used is used and log.flash_attn == fa
    assert (log.context["n_ctx"], log.context["n_ubatch"]) == ("32768", "512") and log.memory_mib == 384.0
    runtime = smoke.runtime(log, ContextParams(n_ctx=32768, threads=16))
    assert runtime.flash_attn_ran == ("on" if used else "off")
    expected = "auto, which llama.cpp resolved to on" if fa == "auto" else fa
    assert f"flash attention {expected}," in runtime.text()
    compute = {b.device: b.mib for b in log.buffers if b.kind == "compute"}
    assert compute["CUDA0"] > (800 if fa == "off" else 99)  # the score matrix is there only without flash attention


def test_a_backend_without_the_kernel_resolves_auto_to_off():
    """A build without flash-attention kernels, as llama_context::resolve_fused_ops logs it (src/llama-context.cpp)."""
    text = load_log("gpu-fa-auto").replace(
        "resolve_fused_ops: Flash Attention enabled",
        "resolve_fused_ops: layer 0 is assigned to device CUDA0 but Flash Attention is assigned to device CPU "
        "(usually due to missing support)\nresolve_fused_ops: Flash Attention not supported, set to disabled")
    log = smoke.parse_log(text)
    assert log.flash_attn_used is False and log.flash_attn == "auto"
    assert "auto, which llama.cpp resolved to off" in smoke.runtime(log, ContextParams(n_ctx=32768)).text()


def _placement(name: str, log_name: str) -> PlacementResult:
    log = smoke.parse_log(load_log(log_name))
    none = Statistic()
    return PlacementResult(name, [], log.overridden, True, log.buffers, 1, 1, none, none, none, none, none,
                           Tokens(1, [1]), [1], None, runtime=smoke.runtime(log, ContextParams(n_ctx=32768, threads=16)))


def _manifest(gpu_memory_used: float) -> Manifest:
    a = Artifact("ph32k-Q4_K_M.gguf", "Q4_K_M", 1, "a" * 64, "quantize", "b" * 64)
    h200 = GpuInfo(0, "NVIDIA H200", 143771.0, gpu_memory_used, "580.159.04", "13.0")
    hardware = Hardware("Intel(R) Xeon(R) Processor", 16, 125.0, [h200], "Linux", 16)
    report = SmokeReport("2026-12-04T00:00:00+00:00", "CUDA", "ok", hardware, {"llama_cpp_commit": "0c1e570"},
                         SmokeSettings(), dict(smoke.METHODS),
                         {a.path: FileResult(a.path, "Q4_K_M", a.sha256, {"gpu": _placement("gpu", "gpu-fa-auto")})})
    return Manifest("ph32k", Source("/x", "local"), {}, [a], report)


def test_the_card_states_the_flash_attention_that_ran():
    lines = card.method_lines(_manifest(2692.0))
    speed = next(line for line in lines if line.startswith("Decode tok/s"))
    assert "flash attention auto, which llama.cpp resolved to on" in speed


def test_smoking_one_file_again_keeps_the_others_when_the_gpu_is_busier():
    """Issue 17, section 5: the GPU's live memory use is a reading, not the machine: a second smoke of one file on
    the same machine keeps every other file's results."""
    first = _manifest(2692.0).smoke
    first.artifacts["other.gguf"] = FileResult("other.gguf", "Q8_0", "c" * 64)
    again = _manifest(9000.0).smoke
    merged = again.merged_into(first)
    assert set(merged.artifacts) == {"ph32k-Q4_K_M.gguf", "other.gguf"}
    elsewhere = _manifest(2692.0).smoke
    elsewhere.hardware.gpus[0].name = "NVIDIA H100 80GB HBM3"
    assert set(elsewhere.merged_into(first).artifacts) == {"ph32k-Q4_K_M.gguf"}  # another machine: not one table
    assert json.dumps(merged.machine()) == json.dumps(first.machine())


def test_plan_kv_is_llama_cpps_for_sliding_window_layers(tmp_path):
    """Issue 17, section 3: gpt-oss keeps half its layers' KV for a 128-token window. plan's KV cache is what
    llama.cpp's allocator sizes (the no_alloc log), and well below the full-context formula."""
    path = ggufs.gpt_oss_sparse(tmp_path / "gpt-oss.gguf")
    p = plan_file(path, 32768)
    text = simulate_context(path, patterns=[], params=ContextParams(n_ctx=32768, threads=1))
    logged = sum(float(m) for m in re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", text))
    assert len(re.findall(r"llama_kv_cache: size =", text)) == 2  # the full-attention layers' cache and the window's
    assert all(r.kv_cache == round(logged * MIB) for r in p.rows)
    formula = kv_cache_bytes(probe(path), 32768)[0]
    assert p.rows[0].kv_cache < 0.6 * formula and p.kv_cache_method.startswith("llama.cpp's allocator (no_alloc)")
