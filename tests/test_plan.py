"""plan: weights, KV cache and compute buffer predicted from the GGUF, checked against a real GPU's figures.

The evidence model (shared/gpu/gen.py OUT 1536 2304 8 12 16, converted by moeprep) is 2.8 GB in F16. Its
GGUFs are rebuilt here as sparse files: the same metadata and the same tensor names, shapes and types, and
a hole where the data would be. llama.cpp's no_alloc simulation never reads tensor data, so a plan of the
sparse file is the plan of the real one; each costs a few kilobytes of disk and milliseconds to write.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moeprep import manifest as mf, plan as plan_mod
from moeprep.cli import main
from moeprep.plan import kv_cache_bytes, plan_file, predict, read_simulation
from moeprep.probe import probe
from moeprep.results import Buffer, FileResult, PlacementResult, Runtime, Statistic, Tokens
from moeprep.units import parse_size

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "evidence-2026-11-26-h200"
MIB = 2**20

# run2/fit-matrix.txt of the evidence: llama-fit-params on the H200, MiB per device (model, context, compute),
# flash attention auto, which that build (GGML_CUDA_FA=OFF) resolves to off. Kept here so the check runs
# wherever the suite does; test_plan_fit_matrix_copy_matches_shared compares it with shared/ where present.
FIT_MATRIX = """\
## phimoe-gpu-F16 c=512 ub=512 gpu
CUDA0 2684 6 37 
Host 1 0 7 
## phimoe-gpu-F16 c=512 ub=512 cpu-moe
CUDA0 92 6 136 
Host 2593 0 7 
## phimoe-gpu-F16 c=512 ub=2048 gpu
CUDA0 2684 6 37 
Host 1 0 7 
## phimoe-gpu-F16 c=512 ub=2048 cpu-moe
CUDA0 92 6 136 
Host 2593 0 7 
## phimoe-gpu-F16 c=4096 ub=512 gpu
CUDA0 2684 48 116 
Host 1 0 14 
## phimoe-gpu-F16 c=4096 ub=512 cpu-moe
CUDA0 92 48 143 
Host 2593 0 14 
## phimoe-gpu-F16 c=4096 ub=2048 gpu
CUDA0 2684 48 464 
Host 1 0 56 
## phimoe-gpu-F16 c=4096 ub=2048 cpu-moe
CUDA0 92 48 464 
Host 2593 0 56 
## phimoe-gpu-F16 c=32768 ub=512 gpu
CUDA0 2684 384 868 
Host 1 0 70 
## phimoe-gpu-F16 c=32768 ub=512 cpu-moe
CUDA0 92 384 868 
Host 2593 0 70 
## phimoe-gpu-F16 c=32768 ub=2048 gpu
CUDA0 2684 384 3400 
Host 1 0 280 
## phimoe-gpu-F16 c=32768 ub=2048 cpu-moe
CUDA0 92 384 3412 
Host 2593 0 280 
## phimoe-gpu-Q4_K_M c=512 ub=512 gpu
CUDA0 812 6 37 
Host 0 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=512 cpu-moe
CUDA0 27 6 69 
Host 785 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=2048 gpu
CUDA0 812 6 37 
Host 0 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=2048 cpu-moe
CUDA0 27 6 69 
Host 785 0 7 
## phimoe-gpu-Q4_K_M c=4096 ub=512 gpu
CUDA0 812 48 116 
Host 0 0 14 
## phimoe-gpu-Q4_K_M c=4096 ub=512 cpu-moe
CUDA0 27 48 119 
Host 785 0 14 
## phimoe-gpu-Q4_K_M c=4096 ub=2048 gpu
CUDA0 812 48 464 
Host 0 0 56 
## phimoe-gpu-Q4_K_M c=4096 ub=2048 cpu-moe
CUDA0 27 48 464 
Host 785 0 56 
## phimoe-gpu-Q4_K_M c=32768 ub=512 gpu
CUDA0 812 384 868 
Host 0 0 70 
## phimoe-gpu-Q4_K_M c=32768 ub=512 cpu-moe
CUDA0 27 384 868 
Host 785 0 70 
## phimoe-gpu-Q4_K_M c=32768 ub=2048 gpu
CUDA0 812 384 3400 
Host 0 0 280 
## phimoe-gpu-Q4_K_M c=32768 ub=2048 cpu-moe
CUDA0 27 384 3412 
Host 785 0 280 
"""
ROWS = [(q, int(c), int(ub), p, int(m), int(kv), int(comp)) for q, c, ub, p, m, kv, comp in
        re.findall(r"## phimoe-gpu-(\S+) c=(\d+) ub=(\d+) (\S+)\nCUDA0 (\d+) (\d+) (\d+)", FIT_MATRIX)]

# run1/manifest.json of the evidence: the GPU smoke's CUDA0 buffers (MiB; model, KV, compute) from real
# loads through llama-cpp-python at ctx 512, n_ubatch 512, flash attention disabled.
SMOKE_H200 = {
    "F16": {"gpu": (2684.19, 6.0, 38.51), "cpu-moe": (92.19, 6.0, 137.6), "n-cpu-moe=4": (1388.19, 6.0, 134.61)},
    "Q4_K_M": {"gpu": (812.11, 6.0, 38.51), "cpu-moe": (27.42, 6.0, 70.9), "n-cpu-moe=4": (419.77, 6.0, 67.91)},
}
# The converted files' tensor bytes (run1/plan-phimoe-gpu-*.json, weights_total).
WEIGHTS_TOTAL = {"F16": 2815760384, "Q4_K_M": 851890688}

WIDTH, FF, BLOCKS, HEADS, KV_HEADS, EXPERTS, VOCAB, HEAD_DIM = 1536, 2304, 8, 12, 3, 16, 384, 128
# llama.cpp's Q4_K_M gives attn_v and ffn_down more bits (q6_K) in the first and last eighth of the blocks and
# every third between; for 8 blocks that is 0, 3, 6, 7 (run1's Q4_K_M log: 49 q4_K, 9 q6_K tensors).
Q6_K_BLOCKS = {0, 3, 6, 7}


def evidence_gguf(path: Path, quant: str, drop: tuple[str, ...] = ()) -> Path:
    """The evidence model's GGUF as a sparse file: its metadata, tensor names, shapes and types; no data."""
    import gguf

    T = gguf.GGMLQuantizationType

    def kind(name: str, shape: tuple[int, ...]):
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            return T.F32
        if quant == "F16":
            return T.F16
        block = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name == "output.weight" or (block in Q6_K_BLOCKS and (".attn_v." in name or ".ffn_down_exps." in name)):
            return T.Q6_K
        return T.Q4_K

    kv = KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": (VOCAB, WIDTH), "rope_factors_long.weight": (HEAD_DIM // 2,),
               "rope_factors_short.weight": (HEAD_DIM // 2,)}
    for b in range(BLOCKS):
        p = f"blk.{b}."
        tensors |= {p + "attn_norm.weight": (WIDTH,), p + "attn_norm.bias": (WIDTH,),
                    p + "attn_q.weight": (WIDTH, WIDTH), p + "attn_q.bias": (WIDTH,),
                    p + "attn_k.weight": (kv, WIDTH), p + "attn_k.bias": (kv,),
                    p + "attn_v.weight": (kv, WIDTH), p + "attn_v.bias": (kv,),
                    p + "attn_output.weight": (WIDTH, WIDTH), p + "attn_output.bias": (WIDTH,),
                    p + "ffn_norm.weight": (WIDTH,), p + "ffn_norm.bias": (WIDTH,),
                    p + "ffn_gate_inp.weight": (EXPERTS, WIDTH),
                    p + "ffn_gate_exps.weight": (EXPERTS, FF, WIDTH), p + "ffn_up_exps.weight": (EXPERTS, FF, WIDTH),
                    p + "ffn_down_exps.weight": (EXPERTS, WIDTH, FF)}
    tensors |= {"output_norm.weight": (WIDTH,), "output_norm.bias": (WIDTH,), "output.weight": (VOCAB, WIDTH),
                "output.bias": (VOCAB,)}

    w = gguf.GGUFWriter(str(path), "phimoe")
    w.add_name("phimoe-gpu")
    w.add_context_length(131072)
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(FF)
    w.add_block_count(BLOCKS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_uint32("phimoe.rope.scaling.original_context_length", 4096)
    w.add_float32("phimoe.rope.scaling.attn_factor", 1.190238118171692)
    w.add_uint32("phimoe.attention.sliding_window", 0)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [f"\u2581w{i}" for i in range(VOCAB - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    end = 0
    for name, shape in tensors.items():
        if name in drop:
            continue
        t = kind(name, shape)
        block, size = gguf.GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=t)
        end = w.ggml_pad(end, w.data_alignment) + nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(w.ggml_pad(f.seek(0, 2), w.data_alignment) + end)  # a hole where the tensor data would be
    return path


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("evidence")
    return {q: evidence_gguf(folder / f"phimoe-gpu-{q}.gguf", q) for q in ("F16", "Q4_K_M")}


def _smoke(quant: str, runtime: Runtime | None) -> FileResult:
    none = Statistic()
    placements = {}
    for name, (model, kv, compute) in SMOKE_H200[quant].items():
        buffers = [Buffer("CUDA0", "model", model, "load_tensors"), Buffer("CUDA0", "KV", kv, "llama_kv_cache"),
                   Buffer("CUDA0", "compute", compute, "sched_reserve"), Buffer("CUDA_Host", "compute", 8.51, "sched_reserve")]
        placements[name] = PlacementResult(name, [], [], True, buffers, 1, 1, none, none, none, none, none,
                                           Tokens(1, [1]), [1], None, runtime=runtime)
    return FileResult(f"phimoe-gpu-{quant}.gguf", quant, "sha", placements)


def _error(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def test_plan_evidence_files_are_the_converted_ones(evidence):
    for quant, path in evidence.items():
        r = probe(path)
        assert r.bytes["total"] == WEIGHTS_TOTAL[quant] and path.stat().st_blocks * 512 < 1 * MIB  # sparse
        assert r.expert_count == EXPERTS and r.block_count == BLOCKS


def test_plan_fit_matrix_copy_matches_shared():
    recorded = SHARED / "run2" / "fit-matrix.txt"
    if not recorded.is_file():
        pytest.skip(f"{recorded} is not in this checkout")
    assert recorded.read_text() == FIT_MATRIX


def test_plan_predicts_the_h200_gpu_totals_within_10_percent(evidence):
    """Issue 11, section 3: for F16 and Q4_K_M, gpu and cpu-moe, ctx 512/4096/32768, ubatch 512/2048, the
    predicted GPU total (weights + KV + compute) is within 10 % of CUDA0's model + KV + compute."""
    errors = {"simulated": [], "staging": [], "total": []}
    plans = {}
    for quant, ctx, ubatch, placement, model, kv, compute in ROWS:
        key = (quant, ctx, ubatch)
        plans[key] = plans.get(key) or plan_file(evidence[quant], ctx, ubatch=ubatch)
        row = next(r for r in plans[key].rows if r.placement == placement)
        assert row.weights_on_gpu / MIB == pytest.approx(model, abs=1) and row.kv_cache == kv * MIB
        total = _error(row.predicted_total / MIB, model + kv + compute)
        assert abs(total) < 10, (key, placement, total)
        errors["total"].append(total)
        e = _error(row.compute / MIB, compute)
        errors["staging" if "staging" in row.compute_method else "simulated"].append(e)
        if ctx == 512 and placement == "gpu":
            # the CPU backend's graph is 4.5 MiB larger than CUDA's at this size: +12 % of a 37 MiB buffer
            assert 0 < (row.compute / MIB - compute) < 5, (key, placement, e)
        else:
            assert abs(e) < 10, (key, placement, e)
    # the errors the method text states are the ones measured here
    for name, values in errors.items():
        assert (round(min(values), 1), round(max(values), 1)) == plan_mod.EVIDENCE_ERRORS[name], name


def test_plan_acceptance_json_compute_at_ctx_32768(evidence):
    result = CliRunner().invoke(main, ["plan", str(evidence["F16"]), "--ctx", "32768", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    gpu = next(r for r in data["rows"] if r["placement"] == "gpu")
    assert data["kind"] == "prediction" and data["compute_buffer"].startswith("PREDICTED by llama.cpp's own allocator")
    assert abs(_error(gpu["compute"] / MIB, 868)) < 10  # fit-matrix.txt: F16, c=32768, ub=512, gpu
    assert gpu["predicted_total"] == gpu["weights_on_gpu"] + gpu["kv_cache"] + gpu["compute"]
    assert (data["n_ctx"], data["n_batch"], data["n_ubatch"], data["ubatch"], data["batch"]) == (32768, 2048, 512, 512, 2048)
    assert data["flash_attn"] == "auto" and gpu["flash_attn"] == "off"
    assert set(gpu["compute_by_flash_attn"]) == {"on", "off"}
    assert gpu["compute_by_flash_attn"]["on"] < gpu["compute_by_flash_attn"]["off"]
    assert "both were simulated" in data["flash_attn_note"]
    assert {s["flash_attn"] for s in data["simulations"]} == {"on", "off"}
    assert all(s["device"] == "CPU" and s["seconds"] < 5 for s in data["simulations"])


def test_plan_human_output_labels_every_figure(evidence):
    result = CliRunner().invoke(main, ["plan", str(evidence["Q4_K_M"]), "--ctx", "512", "--vram", "900MiB"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("phimoe-gpu-Q4_K_M.gguf: PREDICTED from the GGUF")
    assert "n_ubatch 512, flash attention auto" in lines[0]
    assert any(line.startswith("compute buffer: PREDICTED by llama.cpp's own allocator") for line in lines)
    assert "+ compute" in result.output and "here: off" in result.output
    assert "smallest placement predicted to fit 900.00 MiB: gpu" in result.output


def test_plan_flash_attn_on_and_off_as_asked(evidence):
    on = plan_file(evidence["F16"], 32768, flash_attn="on")
    off = plan_file(evidence["F16"], 32768, flash_attn="off")
    assert [s.flash_attn for s in on.simulations] == ["on"] and [s.flash_attn for s in off.simulations] == ["off"]
    gpu_on, gpu_off = on.rows[0], off.rows[0]
    assert gpu_on.flash_attn == "on" and gpu_on.compute < gpu_off.compute / 5  # no n_ctx x n_ubatch score matrix
    assert on.flash_attn_note == "flash attention on, as asked"


def test_plan_stages_experts_only_for_ubatches_cuda_offloads(evidence):
    """Under 32 tokens ggml-cuda keeps the expert matmul on the CPU: nothing is copied to the GPU."""
    small = plan_file(evidence["F16"], 512, ubatch=16)
    rows = {r.placement: r for r in small.rows}
    assert rows["cpu-moe"].compute == rows["gpu"].compute and "staging" not in rows["cpu-moe"].compute_method
    large = {r.placement: r for r in plan_file(evidence["F16"], 512).rows}
    staged = EXPERTS * FF * WIDTH * 2  # one F16 expert tensor (gate, up and down are the same size)
    activations = 512 * 4 * (2 * WIDTH + 2 * 2 * FF)
    assert large["cpu-moe"].compute == staged + activations == large["n-cpu-moe=1"].compute


def test_plan_applies_ctx_and_batch_as_llama_cpp_does(evidence):
    p = plan_file(evidence["Q4_K_M"], 1000, ubatch=2048)
    assert (p.n_ctx, p.n_batch, p.n_ubatch) == (1024, 1000, 1000)  # ctx rounded up to 256; batches capped
    assert p.rows[0].kv_cache == kv_cache_bytes(probe(evidence["Q4_K_M"]), 1024)[0]
    assert "rounds ctx 1000 up to 1024" in p.kv_cache_method


@pytest.mark.parametrize("runtime", [Runtime(8, 8, 512, 512, 512, "disabled", None), None])
def test_plan_states_its_error_against_a_recorded_gpu_smoke(evidence, runtime):
    """The evidence's smoke (real CUDA loads at ctx 512): each row's error, where the settings match."""
    report = probe(evidence["F16"])
    sims = plan_mod.simulate(evidence["F16"], report, ctx=512)
    p = predict(report, 512, smoke=_smoke("F16", runtime), simulations=sims, smoke_ctx=512)
    rows = {r.placement: r for r in p.rows}
    for name, (model, kv, compute) in SMOKE_H200["F16"].items():
        r = rows[name]
        assert abs(r.weights_error_pct) < 0.01 and r.kv_error_pct == 0
        assert abs(r.compute_error_pct) < 10 and abs(r.total_error_pct) < 10, name
        assert r.compute_error_pct == pytest.approx(_error(r.compute_by_flash_attn["off"] / MIB, compute))
    assert "weights, KV, compute (the flash attention off figure) and total compared" in p.measured_note
    other = predict(report, 4096, smoke=_smoke("F16", runtime), simulations=plan_mod.simulate(
        evidence["F16"], report, ctx=4096), smoke_ctx=512)
    assert other.rows[0].weights_error_pct is not None and other.rows[0].compute_error_pct is None
    assert "only at the smoke's n_ctx" in other.measured_note


def test_plan_reads_llama_cpp_cuda_buffers_as_a_gpu_simulation(evidence):
    """On a CUDA build each placement is simulated on the GPU: its CUDA0 compute buffer, staging included,
    is the prediction; host buffers are not counted. The evidence's CUDA load logs stand for those runs."""
    sims = [read_simulation((DATA / "cuda" / f"log-phimoe-gpu-Q4_K_M-{name}.txt").read_text(), placement)
            for name, placement in (("gpu", "gpu"), ("cpu-moe", "cpu-moe"), ("n-cpu-moe-4", "n-cpu-moe=4"))]
    assert [(s.device, s.flash_attn, s.n_ctx, s.n_ubatch) for s in sims] == [("CUDA0", "off", 512, 512)] * 3
    assert [s.compute for s in sims] == [round(m * MIB) for m in (38.51, 70.9, 67.91)]
    assert {b.device for b in sims[1].buffers} == {"CUDA0", "CUDA_Host"}
    report = probe(evidence["Q4_K_M"])
    p = predict(report, 512, simulations=sims)
    rows = {r.placement: r for r in p.rows}
    assert rows["cpu-moe"].compute == sims[1].compute and rows["cpu-moe"].compute_method.endswith("simulated on CUDA0")
    assert "simulated on CUDA0 with its overrides" in p.compute_buffer
    assert p.flash_attn_note == "flash attention auto: llama.cpp resolved it to off on CUDA0"
    assert rows["n-cpu-moe=1"].compute is None  # a placement that was not simulated is not guessed


def test_plan_without_the_file_leaves_the_compute_buffer_out(evidence):
    """What card.py asks for today (predict on a recorded probe): no simulation, said so, totals without it."""
    p = predict(probe(evidence["F16"]), ctx=4096)
    assert p.compute_buffer.startswith("not included") and p.simulations == []
    assert all(r.compute is None and r.predicted_total == r.weights_on_gpu + r.kv_cache for r in p.rows)
    lines = CliRunner().invoke(main, ["plan", str(evidence["F16"]), "--ctx", "8"]).output.splitlines()
    assert "compute buffer not included" not in lines[0]


def test_plan_says_why_when_llama_cpp_cannot_size_it(tmp_path):
    path = evidence_gguf(tmp_path / "no-output-bias.gguf", "Q4_K_M", drop=("output.bias",))
    p = plan_file(path, 512)
    assert p.compute_buffer.startswith("not included: llama.cpp could not load") and "output.bias" in p.compute_buffer
    assert p.rows and all(r.compute is None for r in p.rows)
    result = CliRunner().invoke(main, ["plan", str(path), "--ctx", "512"])
    assert result.exit_code == 0 and "compute buffer not included" in result.output.splitlines()[0]


# Moved from test_smoke.py, on the tiny converted Phi-MoE.

def test_plan_acceptance_phi_moe_cpu_moe_keeps_under_10_percent(converted_phimoe):
    r = plan_file(converted_phimoe / "tiny-phimoe-F16.gguf", ctx=4096)
    rows = {p.placement: p for p in r.rows}
    assert r.kind == "prediction" and r.compute_buffer.startswith("PREDICTED")
    assert rows["cpu-moe"].weights_on_gpu < 0.10 * r.weights_total
    assert rows["gpu"].weights_on_gpu == r.weights_total - r.token_embd_on_cpu
    assert rows["n-cpu-moe=1"].weights_on_gpu > rows["n-cpu-moe=2"].weights_on_gpu == rows["cpu-moe"].weights_on_gpu
    assert all(p.predicted_total == p.weights_on_gpu + p.kv_cache + p.compute for p in r.rows)


def test_plan_kv_cache_matches_llama_cpp(smoked):
    out, _ = smoked
    m = mf.load(out)
    ctx = m.smoke.settings.ctx
    buffers = m.smoke.artifacts["tiny-phimoe-F16.gguf"].placements["gpu"].buffers
    llama_kv = sum(b.mib for b in buffers if b.kind == "KV") * 2**20
    assert kv_cache_bytes(probe(out / "tiny-phimoe-F16.gguf"), ctx)[0] == llama_kv


def test_plan_compute_matches_a_cpu_smoke_of_the_same_settings(smoked):
    """On this CPU build the smoke's compute buffer is the CPU's, which is what the simulation sizes."""
    out, _ = smoked
    m = mf.load(out)
    measured = m.smoke.artifacts["tiny-phimoe-F16.gguf"].placements["gpu"]
    if measured.runtime is None or any(b.on_gpu for b in measured.buffers):
        pytest.skip("needs a CPU smoke that recorded its runtime")
    rt = measured.runtime
    fa = "on" if rt.flash_attn_used else "off"
    p = plan_file(out / "tiny-phimoe-F16.gguf", m.smoke.settings.ctx, ubatch=rt.n_ubatch, batch=rt.n_batch,
                  flash_attn=fa)
    cpu_compute = sum(b.mib for b in measured.buffers if b.kind == "compute" and b.device == "CPU") * 2**20
    assert p.rows[0].compute == pytest.approx(cpu_compute, abs=0.01 * MIB)


def test_plan_vram_names_the_smallest_fit(converted_phimoe):
    path = converted_phimoe / "tiny-phimoe-Q8_0.gguf"
    rows = {p.placement: p.predicted_total for p in plan_file(path, ctx=256).rows}
    between = (rows["n-cpu-moe=1"] + rows["gpu"]) // 2
    assert plan_file(path, ctx=256, vram=between).recommended == "n-cpu-moe=1"
    assert plan_file(path, ctx=256, vram=rows["gpu"]).recommended == "gpu"
    assert plan_file(path, ctx=256, vram=1).recommended is None
    result = CliRunner().invoke(main, ["plan", str(path), "--ctx", "256", "--vram", f"{between}B"])
    assert "PREDICTED" in result.output and "smallest placement predicted to fit" in result.output


def test_plan_sizes_parse():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("16 GB") == 16 * 10**9 and parse_size("512B") == 512
    for bad in ("lots", "512", "1.2.3GiB", "."):
        with pytest.raises(Exception, match="cannot read"):
            parse_size(bad)


def test_plan_dense_model(converted_local):
    r = plan_file(converted_local["llama"] / "tiny-llama-Q8_0.gguf")
    assert not r.is_moe and [p.placement for p in r.rows] == ["gpu"]
    assert r.rows[0].compute > 0 and "Experts on the CPU" not in r.compute_buffer
