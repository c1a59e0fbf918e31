"""smoke, plan and doctor on the CPU build, plus the CUDA-only paths against llama.cpp's own formats."""

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from moeprep import hardware as gpu
from moeprep import placement
from moeprep.cli import main
from moeprep.ggufio.probe import probe
from moeprep.llama.build import versions
from moeprep.predict.plan import predict
from moeprep.quality import scoring as quality
from moeprep.records import manifest as mf
from moeprep.records.results import (
    FileResult,
    FlashAttn,
    GpuInfo,
    Override,
    PlacementResult,
    SmokeReport,
    SmokeSettings,
    Statistic,
    Tokens,
)
from moeprep.stages import measure, smoke

DATA = Path(__file__).parent / "data"
# What this machine's build and driver should give: the suite runs on a CPU build here and on a CUDA
# build where a GPU is lent, and checks what the backend present should do, never assumes one.
GPU_BUILD = bool(versions()["gpu_offload"])
NVML, NVML_WHY = gpu.nvml()


def test_smoke_acceptance_every_artifact_both_placements(smoked):
    out, result = smoked
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    m = mf.load(out)
    assert set(report["artifacts"]) == {a.path for a in m.artifacts}
    for a in m.artifacts:
        r = report["artifacts"][a.path]
        assert r["sha256"] == a.sha256 and r["ok"], r["failures"]
        expected = sorted(probe(out / a.path).expert_tensor_names())
        for name in ("gpu", "cpu-moe"):
            p = r["placements"][name]
            assert p["load_s"]["n"] == 1 and p["load_s"]["mean"] > 0  # one load per placement, as llama-bench
            for figure in ("ttft_s", "decode_tps", "decode_tps_llama", "prompt_tps", "prompt_tps_llama"):
                assert p[figure]["n"] == 3 and p[figure]["sd"] is not None and p[figure]["mean"] > 0, (name, figure)
            assert p["tokens"]["generated"] == [32, 32, 32]  # token ids counted, not words
            assert p["tokens"]["prompt"] > 0
            if NVML is None:  # no NVIDIA driver: not measured, never estimated
                assert p["vram_mib"] is None
            else:
                assert p["vram_mib"]["peak_generation"]["n"] == 3 and p["vram_mib"]["peak_generation"]["mean"] > 0
        cpu_moe = r["placements"]["cpu-moe"]
        assert sorted(o["tensor"] for o in cpu_moe["overridden"]) == expected
        assert cpu_moe["overrides_match_probe"]
        assert r["placements"]["gpu"]["overridden"] == []
        q = r["quality"]
        assert q["finite"] and (q["text"], q["ctx"], q["chunks"]) == ("eval-en.txt", 128, 2)
        assert q["positions"] == 2 * (128 - 1 - 64)  # the second half of each chunk, less its last token
        assert q["text_sha256"] == hashlib.sha256((DATA.parent.parent / "moeprep/data/eval-en.txt").read_bytes()).hexdigest()
        assert q["text_tokens"] > 2 * 128 and (q["n_seq"], q["n_batch"], q["n_ubatch"]) == (16, 2048, 512)
        agreement = r["greedy_agreement"]
        assert agreement["between"] == ["gpu", "cpu-moe"] and agreement["positions"] == 32
        if not GPU_BUILD:  # on one CPU both placements compute the same; CUDA and CPU kernels may differ
            assert agreement["identical"]
    assert report["backend"] == ("CUDA" if GPU_BUILD else "CPU")
    assert report["tools"]["llama_cpp_commit"].startswith("0c1e570")
    assert m.to_dict()["smoke"]["artifacts"] == report["artifacts"]
    assert m.smoke.hardware.cpu and m.smoke.settings.runs == 3
    s = m.smoke.settings
    assert (s.quality_text, s.quality_ctx, s.quality_chunks) == ("eval-en.txt", 128, 2)


def test_smoke_measures_with_llama_server_defaults_and_records_them(smoked):
    """threads = physical cores, flash attention auto, n_batch 2048 (capped at n_ctx by llama.cpp), n_ubatch 512,
    read back from llama.cpp's own load log for every placement of every file."""
    out, _ = smoked
    s = mf.load(out).smoke
    assert (s.settings.threads, s.settings.flash_attn, s.settings.n_batch, s.settings.n_ubatch) == (
        gpu.physical_cores(), "auto", 2048, 512)
    for result in s.artifacts.values():
        for p in result.placements.values():
            r = p.runtime
            assert (r.threads, r.threads_batch) == (gpu.physical_cores(),) * 2
            assert (r.n_ctx, r.n_batch, r.n_ubatch) == (s.settings.ctx, min(2048, s.settings.ctx), 512)
            assert (r.n_seq_max, r.kv_unified) == (4, True)  # llama-server's --parallel auto: 4 slots, one cache
            assert r.flash_attn == "auto" and isinstance(r.flash_attn_used, bool)  # resolved, and the log said how
            if not GPU_BUILD:
                assert r.flash_attn_used is True  # the CPU backend has the kernel for every head size


def test_smoke_flash_attn_off_is_recorded(converted_phimoe):
    settings = SmokeSettings(runs=1, new_tokens=4, threads=1, flash_attn="off")
    r = smoke.run_placement(converted_phimoe / "tiny-phimoe-Q8_0.gguf", placement.parse("gpu"), [], settings, None)
    # nothing is resolved when flash attention is asked for: what was asked is what ran
    assert (r.runtime.flash_attn, r.runtime.flash_attn_used, r.runtime.threads) == (FlashAttn.OFF, False, 1)  # llama.cpp logs "disabled": recorded in one spelling
    assert "flash attention off," in r.runtime.text()


def test_smoke_kld_orders_the_quants(smoked):
    out, _ = smoked
    q = {r.quant: r.quality for r in mf.load(out).smoke.artifacts.values()}
    # the F16 against its own log-probabilities as llama-perplexity stores them (16 bits): the method's floor
    assert q["F16"].kld_mean < 1e-6 and q["F16"].top1_agreement > 0.99 and q["F16"].ppl == q["F16"].ppl_reference
    assert q["F16"].kld_mean < q["Q8_0"].kld_mean < q["Q4_K_M"].kld_mean < q["Q2_K"].kld_mean
    assert q["Q8_0"].top1_agreement > q["Q4_K_M"].top1_agreement > q["Q2_K"].top1_agreement
    assert q["Q8_0"].rms_dp < q["Q4_K_M"].rms_dp < q["Q2_K"].rms_dp
    for r in q.values():  # one F16, one text, one chunking for every file
        assert r.ppl_reference == q["F16"].ppl and r.kld_se > 0 and r.kld_median <= r.kld_p99 <= r.kld_p999 <= r.kld_max


def test_smoke_override_log_names_cpu_buffers(smoked):
    out, _ = smoked
    r = mf.load(out).smoke.artifacts["tiny-phimoe-Q4_K_M.gguf"]
    # The override target is the CPU buffer type. On a CPU-only build llama.cpp may pick its repacking
    # variant; on CUDA it is pinned host memory, CUDA_Host.
    want = {"CUDA_Host"} if GPU_BUILD else {"CPU", "CPU_REPACK", "CPU_Mapped"}
    assert {o.buffer_type for o in r.placements["cpu-moe"].overridden} <= want
    kinds = {b.kind for b in r.placements["cpu-moe"].buffers}
    assert {"model", "KV", "compute"} <= kinds


def test_smoke_n_cpu_moe_moves_only_the_first_blocks(converted_phimoe):
    settings = SmokeSettings(runs=1, new_tokens=4)
    n1 = placement.parse("n-cpu-moe=1")
    expected = [t.name for t in probe(converted_phimoe / "tiny-phimoe-Q8_0.gguf").layers[0].experts]
    r = smoke.run_placement(converted_phimoe / "tiny-phimoe-Q8_0.gguf", n1, expected, settings, None)
    assert sorted(o.tensor for o in r.overridden) == sorted(expected)
    assert all(o.tensor.startswith("blk.0.") for o in r.overridden)
    assert r.failures == []


def test_smoke_override_mismatch_fails(converted_phimoe):
    r = smoke.run_placement(converted_phimoe / "tiny-phimoe-Q8_0.gguf", placement.parse("cpu-moe"),
                            ["blk.0.ffn_up_exps.weight"], SmokeSettings(runs=1, new_tokens=4), None)
    assert not r.overrides_match_probe
    assert r.failures == ["cpu-moe: llama.cpp overrode 6 tensors, the probe expects 1"]


def test_smoke_degenerate_judgement():
    assert quality.degenerate([5] * 20 + [1, 2, 3, 4])
    assert not quality.degenerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9])
    assert not quality.degenerate([7] * 5)  # too short to judge
    varied = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert quality.degenerates_alone([3] * 12, varied)
    assert not quality.degenerates_alone([3] * 12, [1, 2, 3, 4, 5, 6, 7, 8, 4, 4, 4, 4])  # the F16 loops too
    assert not quality.degenerates_alone(varied, varied)


def _crafted(src, dst, edit):
    """A copy of `src` with one tensor's values changed in place through gguf-py's writable memmap."""
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    edit({t.name: t.data for t in reader.tensors})
    reader.data.flush()
    return dst


# A prompt on which the tiny F16 does not fall into a one-token loop (checked below): random-weight
# models often do, and then no quant can be blamed for it.
VARIED = SmokeSettings(runs=1, prompt="Numbers such as 1, 2, 3", placements=["gpu"], quality_ctx=128, quality_chunks=2)


@pytest.fixture(scope="session")
def reference(converted_phimoe):
    ref = measure.reference_for(converted_phimoe / "tiny-phimoe-F16.gguf", None, VARIED)
    assert not quality.loops(ref.greedy_tokens), ref.greedy_tokens
    return ref


@pytest.mark.parametrize("case, failure", [
    ("one_token", "degenerate output"),
    ("eos_first", "empty output"),
    ("nan", "NaN or inf in the logits"),
])
def test_smoke_fails_crafted_broken_files(case, failure, converted_phimoe, reference, tmp_path):
    def edit(t):
        if case == "one_token":
            t["output.bias"][123] = 1e4  # one token wins every step
        elif case == "eos_first":
            t["output.bias"][2] = 1e4  # </s> wins the first step
        else:
            t["output_norm.weight"][:] = np.nan

    path = _crafted(converted_phimoe / "tiny-phimoe-F16.gguf", tmp_path / f"crafted-{case}.gguf", edit)
    r = smoke.smoke_file(smoke.Target(path, "F16"), VARIED, None, reference)
    assert not r.ok
    assert any(failure in f for f in r.failures), r.failures


def test_smoke_cli_exit_code_on_failure(converted_phimoe, tmp_path):
    path = _crafted(converted_phimoe / "tiny-phimoe-Q8_0.gguf", tmp_path / "broken-Q8_0.gguf",
                    lambda t: t["output.bias"].__setitem__(2, 1e4))
    result = CliRunner().invoke(main, ["smoke", str(path), "--runs", "1", "--placement", "gpu"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "Error: smoke failed for broken-Q8_0.gguf: gpu: empty output")


def test_smoke_unknown_placement_is_a_clear_error(converted_phimoe):
    result = CliRunner().invoke(main, ["smoke", str(converted_phimoe), "--placement", "cpu-only"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: unknown placement 'cpu-only' (use gpu, cpu-moe or n-cpu-moe=N)"


# --- CUDA-only paths, against text rendered from llama.cpp's own format strings --------------------
# These are the LLAMA_LOG_* format strings of the llama.cpp that llama-cpp-python 0.3.36 vendors
# (src/llama-model-loader.cpp, src/llama-model.cpp, src/llama-kv-cache.cpp, src/llama-context.cpp).
# No GPU run has been recorded yet: see README, "GPU status".
OVERRIDE = "tensor %s (%d MiB %s) buffer type overridden to %s"
MODEL_BUF = "%s: %12s model buffer size = %8.2f MiB"
KV_BUF = "%s: %10s KV buffer size = %8.2f MiB"
COMPUTE_BUF = "%s: %10s compute buffer size = %8.2f MiB"
OUTPUT_BUF = "%s: %10s  output buffer size = %8.2f MiB"


def cuda_log():
    lines = [OVERRIDE % (f"blk.{b}.ffn_{p}_exps.weight", 288, "q4_K", "CUDA_Host")
             for b in range(2) for p in ("gate", "down", "up")]
    lines += [
        MODEL_BUF % ("load_tensors", "CUDA0", 1371.52),
        MODEL_BUF % ("load_tensors", "CUDA_Host", 1728.00),
        MODEL_BUF % ("load_tensors", "CPU_Mapped", 81.00),
        OUTPUT_BUF % ("llama_context", "CUDA_Host", 0.12),
        KV_BUF % ("llama_kv_cache", "CUDA0", 512.00),
        COMPUTE_BUF % ("sched_reserve", "CUDA0", 300.75),
        COMPUTE_BUF % ("sched_reserve", "CUDA_Host", 24.01),
    ]
    return "\n".join(lines) + "\n"


def test_smoke_parses_cuda_log_lines():
    log = smoke.parse_log(cuda_log())
    assert [o.buffer_type for o in log.overridden] == ["CUDA_Host"] * 6
    assert log.overridden[1] == Override("blk.0.ffn_down_exps.weight", "q4_K", "CUDA_Host")
    assert {(b.device, b.kind): b.mib for b in log.buffers} == {
        ("CUDA0", "model"): 1371.52, ("CUDA_Host", "model"): 1728.0, ("CPU_Mapped", "model"): 81.0,
        ("CUDA_Host", "output"): 0.12, ("CUDA0", "KV"): 512.0, ("CUDA0", "compute"): 300.75,
        ("CUDA_Host", "compute"): 24.01,
    }


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
@pytest.mark.parametrize("name, moved", [("gpu", 0), ("cpu-moe", 24), ("n-cpu-moe-4", 12)])
def test_smoke_parses_the_recorded_h200_load_logs(quant, name, moved):
    """The raw llama.cpp CUDA load logs of the first GPU run: an 8-block, 16-expert Phi-MoE, 3 expert tensors
    (gate, up, down) per block, so cpu-moe moves 24 and n-cpu-moe=4 moves 12, all to pinned host memory."""
    log = smoke.parse_log((DATA / "cuda" / f"log-phimoe-gpu-{quant}-{name}.txt").read_text())
    assert len(log.overridden) == moved and {o.buffer_type for o in log.overridden} <= {"CUDA_Host"}
    by = {(b.device, b.kind): b.mib for b in log.buffers}
    assert by[("CUDA0", "model")] > 0 and by[("CUDA0", "KV")] == 6.0 and by[("CUDA0", "compute")] > 0
    if name == "cpu-moe":  # with mmap on, the experts overridden to host memory end in the mapped CPU buffer
        assert by[("CPU_Mapped", "model")] > 20 * by[("CUDA0", "model")]
    assert log.context == {"n_ctx": "512", "n_batch": "512", "n_ubatch": "512", "flash_attn": "disabled",
                           "n_seq_max": "1", "kv_unified": "false"}  # llama-cpp-python's context, not llama-server's
    assert log.flash_attn_used is False and log.memory_mib == 6.0
    none = Statistic()
    result = PlacementResult(name, [], log.overridden, True, log.buffers, 1, 1, none, none, none, none, none,
                             Tokens(1, [1]), [1], None)
    assert result.gpu_bytes()["model"] == by[("CUDA0", "model")] * 2**20


def test_plan_compares_with_a_recorded_gpu_smoke(converted_phimoe):
    report = probe(converted_phimoe / "tiny-phimoe-Q4_K_M.gguf")
    predicted = {p.placement: p.weights_on_gpu for p in predict(report).rows}
    buffers = smoke.parse_log(cuda_log()).buffers
    none = Statistic()
    recorded = PlacementResult("cpu-moe", [], [], True, buffers, 1, 1, none, none, none, none, none, Tokens(1, [1]),
                               [1], None)
    assert recorded.gpu_bytes() == {"model": 1371.52 * 2**20, "KV": 512 * 2**20, "compute": 300.75 * 2**20}
    fake = FileResult(report.file, "Q4_K_M", "s", {"cpu-moe": recorded})
    row = next(p for p in predict(report, smoke=fake).rows if p.placement == "cpu-moe")
    assert row.weights_error_pct == pytest.approx(100 * (predicted["cpu-moe"] - 1371.52 * 2**20) / (1371.52 * 2**20))
    # results of other bytes never count: the manifest answers only for the exact sha256
    m = mf.load(converted_phimoe)
    art = m.artifact_at(report.file)
    m.smoke = SmokeReport("2026-11-26T00:00:00+00:00", "CUDA", "ok", gpu.hardware(None), {}, SmokeSettings(), {},
                          {art.path: FileResult(art.path, "Q4_K_M", "another-sha", {"cpu-moe": recorded})})
    assert m.smoke_result(art) is None
    m.smoke.artifacts[art.path].sha256 = art.sha256
    assert m.smoke_result(art) is m.smoke.artifacts[art.path]


class FakeNvml:
    """pynvml's calls, answering with readings shaped as nvidia-ml-py returns them."""

    def __init__(self, used, own=None):
        self.used = list(used)
        self.own = own  # this process's bytes, or an exception the driver raises for per-process accounting

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if isinstance(self.own, Exception):
            raise self.own
        others = [SimpleNamespace(pid=1, usedGpuMemory=5 * 2**30)]
        return others + ([SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.own)] if self.own is not None else [])

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self.used.pop(0) if len(self.used) > 1 else self.used[0]
        return SimpleNamespace(total=85520809984, used=used, free=85520809984 - used)


def test_gpu_nvml_readings():
    nv = gpu.Nvml(FakeNvml([1 * 2**30]))
    [g] = nv.gpus()
    assert g == GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", memory_total_mib=81559.0, memory_used_mib=1024.0,
                        driver="550.54.15", cuda="12.4")


def test_gpu_nvml_per_process_memory_and_its_absence():
    # as nvml-process.txt recorded on the H200: this process alone, other processes' memory left out
    assert gpu.Nvml(FakeNvml([2 * 2**30], own=1447034880)).process_mib() == 1380.0
    assert gpu.Nvml(FakeNvml([2 * 2**30], own=None)).process_mib() is None
    assert gpu.Nvml(FakeNvml([2 * 2**30], own=RuntimeError("Not Supported"))).process_mib() is None
    with gpu.PeakWatch(gpu.Nvml(FakeNvml([100 * 2**20], own=700 * 2**20)), interval=0.001) as watch:
        pass
    assert (watch.peak_mib, watch.process_peak_mib) == (100.0, 700.0)


def test_gpu_peak_watch_keeps_the_highest_reading():
    nv = gpu.Nvml(FakeNvml([100 * 2**20, 900 * 2**20, 300 * 2**20, 200 * 2**20]))
    import time

    with gpu.PeakWatch(nv, interval=0.001) as watch:
        time.sleep(0.05)
    assert watch.peak_mib == 900.0


def test_gpu_nvml_is_read_where_a_driver_is_and_reported_absent_where_not():
    if NVML is None:
        assert NVML_WHY.startswith(("NVML unavailable", "nvidia-ml-py is not installed"))
        assert gpu.hardware(None).gpus == []
    else:
        assert NVML_WHY == "ok"
        gpus = gpu.hardware(NVML).gpus
        assert gpus and all(g.memory_total_mib > 0 and g.driver for g in gpus)


def test_doctor_reports_the_backends_present():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["backends"] == (["CPU", "CUDA"] if GPU_BUILD else ["CPU"])
    assert data["tools"]["gpu_offload"] is GPU_BUILD
    assert (data["nvml"] == "ok") is (NVML is not None)
    assert data["tools"]["llama_cpp_commit"].startswith("0c1e570")
    assert data["gguf"]["files_changed"] == []


def test_the_sweep_measures_every_block_of_a_small_model_and_eight_points_of_a_large_one():
    from moeprep.stages.smoke import sweep

    assert [str(p) for p in sweep(2)] == ["gpu", "n-cpu-moe=1", "n-cpu-moe=2", "cpu-moe"]
    large = [str(p) for p in sweep(61)]
    assert large[0] == "gpu" and large[-1] == "cpu-moe" and len(large) == 10
    assert large[1] == "n-cpu-moe=1" and large[-2] == "n-cpu-moe=61"  # both ends


def test_smoke_sweep_records_the_offload_curve_and_the_card_shows_it(converted_phimoe, tmp_path):
    from tests.test_error_catalogue import linked_copy

    d = linked_copy(converted_phimoe, tmp_path / "tiny-phimoe-GGUF")
    result = CliRunner().invoke(main, ["smoke", str(d), "--sweep", "--runs", "1", "--quality-ctx", "128",
                                       "--quality-chunks", "2"])
    assert result.exit_code == 0, result.output
    m = mf.load(d)
    assert m.smoke.settings.sweep and [str(p) for p in m.smoke.settings.placements] == [
        "gpu", "n-cpu-moe=1", "n-cpu-moe=2", "cpu-moe"]
    for a in m.artifacts:
        assert list(m.smoke_result(a).placements) == ["gpu", "n-cpu-moe=1", "n-cpu-moe=2", "cpu-moe"]
    assert CliRunner().invoke(main, ["card", str(d), "--repo-id", "me/x-GGUF"]).exit_code == 0
    text = (d / "README.md").read_text()
    assert "The offload curve (F16, Q8_0, Q4_K_M, Q2_K; `moeprep smoke --sweep`)" in text
    q4 = m.smoke_result(m.artifact("Q4_K_M")).placements["gpu"].decode_tps.mean
    assert f"; {q4:.1f} tok/s on CPU |" in text  # the tier cell's placement, as the sweep measured it
    again = CliRunner().invoke(main, ["smoke", str(d), "--sweep", "--placement", "gpu"])
    assert again.exit_code == 1 and "give --sweep or --placement, not both" in again.stderr


def test_a_recipe_asks_for_the_sweep_and_a_staged_sweep_answers_it(tmp_path):
    import yaml

    from moeprep.release import recipe, staging

    data = yaml.safe_load((Path(__file__).parent / "data" / "recipes" / "tiny-phimoe.yaml").read_text())
    data["smoke"] = {**data.get("smoke", {}), "sweep": True}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    asked = staging.smoke_settings(recipe.load(path))
    assert asked.sweep
    from dataclasses import replace

    from moeprep.stages.smoke import sweep

    ran = replace(asked, placements=sweep(2), threads=4)  # as the smoke job resolved it for this model
    assert ran.request_key() == asked.request_key()
