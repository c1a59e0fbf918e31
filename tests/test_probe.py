"""probe: expert layouts read with gguf-py, and the tensors --cpu-moe / --n-cpu-moe N would move."""

import re

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.ggufio.probe import probe
from moeprep.placement import CPU_MOE_PATTERN, n_cpu_moe_patterns
from tests import ggufs
from tests.llm import generate


def placement(report, name):
    return next(p for p in report.placements if p.name == name)


def test_probe_patterns_are_llama_cpp_s():
    assert CPU_MOE_PATTERN == r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    assert n_cpu_moe_patterns(2) == [rf"blk\.0{CPU_MOE_PATTERN}", rf"blk\.1{CPU_MOE_PATTERN}"]


def test_probe_phimoe_from_the_converter(converted_phimoe):
    r = probe(converted_phimoe / "tiny-phimoe-Q4_K_M.gguf")
    assert (r.architecture, r.block_count, r.expert_count, r.expert_used_count) == ("phimoe", 2, 16, 2)
    assert r.layout == "merged" and r.loadable
    assert r.file_type == "MOSTLY_Q4_K_M"
    assert r.expert_tensor_names() == [f"blk.{b}.ffn_{p}_exps.weight" for b in (0, 1) for p in ("down", "gate", "up")]
    assert [t.name for layer in r.layers for t in layer.router] == ["blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight"]
    cpu_moe = placement(r, "cpu-moe")
    assert cpu_moe.bytes_moved == r.bytes["expert"]
    assert cpu_moe.bytes_on_gpu == r.bytes["total"] - r.bytes["expert"] - r.bytes["input_layer"]
    assert r.bytes["input_layer"] > 0
    # Phi-3.5-MoE's weights are almost all experts: --cpu-moe leaves under 10 % on the GPU.
    assert cpu_moe.bytes_on_gpu < 0.10 * r.bytes["total"]
    assert placement(r, "n-cpu-moe=1").bytes_moved == r.layers[0].expert_bytes


def test_probe_qwen2moe_shared_experts_stay_and_file_loads(tmp_path, checkpoints):
    path = ggufs.qwen2moe(tmp_path / "qwen2moe.gguf", checkpoints["phimoe"] / "tokenizer.model")
    r = probe(path)
    assert r.layout == "merged"
    assert all(len(layer.shared) == 4 for layer in r.layers)
    shared = {t.name for layer in r.layers for t in layer.shared}
    moved = [n for n in r.expert_tensor_names()]
    assert not shared & set(moved)
    assert all(not re.search(CPU_MOE_PATTERN, n) for n in shared)
    assert r.bytes["shared_expert"] > 0
    assert placement(r, "cpu-moe").bytes_on_gpu == r.bytes["total"] - r.bytes["expert"] - r.bytes["input_layer"]
    assert len(generate(path)) == 8  # the layout is one llama.cpp really loads


def test_probe_deepseek2_counts_leading_dense_blocks(tmp_path):
    r = probe(ggufs.deepseek2(tmp_path / "ds2.gguf"))
    assert (r.leading_dense_block_count, r.expert_shared_count, r.block_count) == (1, 2, 3)
    assert [layer.block for layer in r.layers] == [1, 2]
    assert {t.name for t in r.layers[0].router} == {"blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias"}
    # --n-cpu-moe counts from block 0, dense blocks included: N=1 moves nothing here.
    assert placement(r, "n-cpu-moe=1").bytes_moved == 0
    assert placement(r, "n-cpu-moe=2").bytes_moved == r.layers[0].expert_bytes


def test_probe_gpt_oss_moves_expert_biases(tmp_path):
    r = probe(ggufs.gpt_oss(tmp_path / "gpt-oss.gguf"))
    names = r.expert_tensor_names()
    assert "blk.0.ffn_gate_exps.bias" in names and "blk.1.ffn_down_exps.bias" in names
    assert placement(r, "cpu-moe").tensors_moved == len(names) == 12
    assert "blk.0.ffn_gate_inp.bias" not in names


def test_probe_fused_gate_up(tmp_path):
    r = probe(ggufs.fused_gate_up(tmp_path / "fused.gguf"))
    assert "blk.0.ffn_gate_up_exps.weight" in r.expert_tensor_names()
    assert any("fused" in n for n in r.notes)
    assert placement(r, "cpu-moe").bytes_moved == r.bytes["expert"]


def test_probe_legacy_per_expert_layout_is_flagged(tmp_path):
    r = probe(ggufs.legacy_mixtral(tmp_path / "legacy.gguf"))
    assert r.layout == "legacy-per-expert" and not r.loadable
    assert "blk.0.ffn_gate.3.weight" in r.expert_tensor_names()
    assert any("cannot load" in n for n in r.notes)


def test_probe_dense_model_is_reported_dense(converted_local):
    r = probe(converted_local["llama"] / "tiny-llama-F16.gguf")
    assert r.layout == "dense" and not r.is_moe
    assert r.bytes["expert"] == 0 and [p.name for p in r.placements] == ["gpu"]
    result = CliRunner().invoke(main, ["probe", str(converted_local["llama"] / "tiny-llama-F16.gguf")])
    assert "--cpu-moe and --n-cpu-moe would change nothing" in result.output


def test_probe_json_output(converted_phimoe):
    import json

    result = CliRunner().invoke(main, ["probe", str(converted_phimoe / "tiny-phimoe-Q8_0.gguf"), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["expert_count"] == 16
    assert data["layers"][0]["expert_bytes"] > 0
    assert {p["name"] for p in data["placements"]} == {"gpu", "cpu-moe", "n-cpu-moe=1", "n-cpu-moe=2"}


def test_probe_truncated_file_is_one_clear_error(tmp_path, converted_phimoe):
    data = (converted_phimoe / "tiny-phimoe-Q8_0.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["probe", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad} is truncated")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a gguf at all" * 10])
def test_probe_non_gguf_file_is_one_clear_error(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    result = CliRunner().invoke(main, ["probe", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad} is not a GGUF file")
    assert len(result.output.strip().splitlines()) == 1


def test_probe_types_per_class_show_a_tensor_type_rule(converted_phimoe, tmp_path):
    """Issue 12's acceptance, seen through probe: `--tensor-type 'attn_.*=Q8_0'` makes every attention weight Q8_0."""
    import shutil

    out = tmp_path / "typed"
    shutil.copytree(converted_phimoe, out, ignore=shutil.ignore_patterns(".moeprep.lock"))
    result = CliRunner().invoke(main, ["quantize", str(out / "tiny-phimoe-F16.gguf"), "--quant", "Q4_K_M",
                                       "--tensor-type", "attn_.*=Q8_0", "--json"])
    assert result.exit_code == 0, result.output
    r = probe(out / "tiny-phimoe-Q4_K_M.gguf")
    assert r.types["attention"] == {"Q8_0": 8, "F32": 8}  # 2 blocks x q, k, v, output weights; the biases stay F32
    assert "Q8_0" not in r.types["experts"] and r.types["routers"] == {"F32": 2}
    plain = probe(converted_phimoe / "tiny-phimoe-Q4_K_M.gguf")
    assert "Q8_0" not in plain.types["attention"]
    shown = CliRunner().invoke(main, ["probe", str(out / "tiny-phimoe-Q4_K_M.gguf")]).output
    assert "attention F32 x8, Q8_0 x8" in shown
