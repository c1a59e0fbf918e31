"""The tier table: which file and placement fit a GPU size at a context, what RAM, what to type."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from moeprep.cli import main
from moeprep.placement import CPU_MOE, parse
from moeprep.predict.plan import contexts_for
from moeprep.predict.tiers import GIB, cell_text
from moeprep.records import manifest as mf
from moeprep.records.results import FlashAttn
from moeprep.stages.plan import plan_file
from moeprep.stages.plan import tiers as table


def test_tiers_pick_the_placement_with_the_most_on_the_gpu_that_fits(converted_phimoe):
    path = converted_phimoe / "tiny-phimoe-Q8_0.gguf"
    rows = {r.placement: r for r in plan_file(path, 4096).rows}
    sizes = [rows["gpu"].predicted_total, rows["n-cpu-moe=1"].predicted_total, rows["cpu-moe"].predicted_total,
             rows["cpu-moe"].predicted_total - 1]
    t = table(path, tiers_gib=[s / GIB for s in sizes], contexts=[4096], headroom_mib=0)
    by_size = {round(tier.gib * GIB): tier.cells[0] for tier in t.tiers if tier.ctx == 4096}
    got = [by_size[s].placement for s in sizes]
    assert got == ["gpu", "n-cpu-moe=1", "cpu-moe", None]
    gpu_cell, n1, cpu_moe, none = (by_size[s] for s in sizes)
    assert gpu_cell.ram_bytes == plan_file(path, 4096).token_embd_on_cpu  # all on the GPU but the input layer
    assert cpu_moe.ram_bytes > n1.ram_bytes > gpu_cell.ram_bytes
    # --fit off: llama-server's --fit, on by default, would give up once an offload is set; threads left to its
    # default, one per physical core of the machine the command runs on
    assert n1.command == ("llama-server -m tiny-phimoe-Q8_0.gguf --n-gpu-layers 999 --n-cpu-moe 1 --ctx-size 4096 "
                          "--flash-attn auto --fit off")
    assert cpu_moe.command.split(" --ctx-size")[0].endswith("--cpu-moe")
    assert cell_text(none) == "does not fit"
    assert cell_text(gpu_cell) == f"all on GPU: GPU {gpu_cell.gpu_bytes / 2**20:.0f} MiB, RAM 0 MiB; speed not measured"
    assert cell_text(n1).startswith("`--n-cpu-moe 1`: GPU ") and ", RAM " in cell_text(n1)


def test_tiers_cells_are_in_the_units_gpus_are_sold_in():
    from moeprep.predict.tiers import Cell

    cell = Cell("m.gguf", "Q4_K_M", parse("n-cpu-moe=5"), int(10.26 * GIB), int(27.5 * GIB), "llama-server ...")
    assert cell_text(cell) == "`--n-cpu-moe 5`: GPU 10.3 GiB, RAM 27.5 GiB; speed not measured"
    cell.speed = "41.2 tok/s on CUDA"
    assert cell_text(cell) == "`--n-cpu-moe 5`: GPU 10.3 GiB, RAM 27.5 GiB; 41.2 tok/s on CUDA"


def test_tiers_commands_quote_every_argument():
    from moeprep.predict.tiers import command

    line = command("a;$(touch x) b.gguf", CPU_MOE, 4096, FlashAttn.AUTO)
    assert line == "llama-server -m 'a;$(touch x) b.gguf' --n-gpu-layers 999 --cpu-moe --ctx-size 4096 --flash-attn auto --fit off"


def test_tiers_headroom_is_kept_below_each_size(converted_phimoe):
    path = converted_phimoe / "tiny-phimoe-Q8_0.gguf"
    need = {r.placement: r for r in plan_file(path, 4096).rows}["gpu"].predicted_total
    tight = table(path, tiers_gib=[need / GIB], contexts=[4096], headroom_mib=0).tiers[0].cells[0]
    roomy = table(path, tiers_gib=[need / GIB], contexts=[4096], headroom_mib=1).tiers[0].cells[0]
    assert tight.placement == "gpu" and roomy.placement != "gpu"


def test_tiers_contexts_stop_at_the_trained_maximum():
    assert contexts_for(8192) == [4096, 8192]
    assert contexts_for(131072) == [4096, 16384, 32768, 131072]
    assert contexts_for(None, [2048]) == [2048]


def test_tiers_every_quant_of_a_directory_and_the_card_carries_them(converted_phimoe, tmp_path):
    out = tmp_path / "tiers"
    shutil.copytree(converted_phimoe, out, ignore=shutil.ignore_patterns(".moeprep.lock"))
    t = table(out)
    assert t.contexts == [4096, 8192] and {len(tier.cells) for tier in t.tiers} == {4}
    assert "not measured for these files" in t.headroom_method
    assert CliRunner().invoke(main, ["card", str(out)]).exit_code == 0
    text = (out / "README.md").read_text()
    assert "## Which file fits your GPU (predicted, not measured)" in text
    assert "| GPU memory | F16 | Q8_0 | Q4_K_M | Q2_K |" in text and "| 8 GiB | all on GPU: GPU " in text
    assert "llama-server -m tiny-phimoe-Q4_K_M.gguf --n-gpu-layers 999 --ctx-size 4096 --flash-attn auto --fit off" in text


def test_tiers_cli_prints_a_command_per_cell_and_json(converted_phimoe):
    result = CliRunner().invoke(main, ["plan", str(converted_phimoe), "--tiers", "0.001,8", "--json"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout)
    assert data["kind"] == "prediction" and [t["gib"] for t in data["tiers"][:2]] == [0.001, 8]
    cells = [c for t in data["tiers"] for c in t["cells"]]
    assert {c["placement"] for c in cells if c["placement"]} == {"gpu"} and any(c["placement"] is None for c in cells)
    human = CliRunner().invoke(main, ["plan", str(converted_phimoe), "--tiers", "8"])
    assert "PREDICTED, not measured" in human.output and human.output.count("llama-server -m ") == 4 * 2
    bad = CliRunner().invoke(main, ["plan", str(converted_phimoe), "--tiers", "big"])
    assert bad.exit_code == 1 and "cannot read 'big' as GPU sizes" in bad.stderr


def test_a_q8_0_cache_fits_a_longer_context_where_the_kv_cache_dominates(tmp_path):
    """`plan --tiers --cache-type q8_0`: the longest context per tier, from llama.cpp's own sizings of a q8_0 cache."""
    import json

    from tests import ggufs

    path = ggufs.kv_heavy(tmp_path / "long.gguf")
    reach = {}
    for cache in ("f16", "q8_0"):
        result = CliRunner().invoke(main, ["plan", str(path), "--tiers", "8,24", "--cache-type", cache, "--json"])
        assert result.exit_code == 0, result.output
        reach[cache] = {x["gib"]: x for x in json.loads(result.stdout)["longest"]}
    f16, q8 = reach["f16"][8]["ctx"], reach["q8_0"][8]["ctx"]
    assert 1.7 < q8 / f16 < 2.0  # a q8_0 element is 34/64 of an f16 one; weights and compute stay
    assert reach["q8_0"][24]["limit"] and reach["q8_0"][24]["ctx"] == 1 << 20  # the model's own limit
    assert f16 % 256 == 0 and not reach["f16"][8]["limit"]
    from moeprep.ggufio.probe import probe
    from moeprep.llama.sizing import simulate

    report = probe(path)
    sims = {c: simulate(path, report, ctx=32768, cache_type=c) for c in ("f16", "q8_0")}
    assert sims["q8_0"][0].kv * 64 == sims["f16"][0].kv * 34  # llama.cpp's allocator, not a formula
    assert all(s.flash_attn == "on" for s in sims["q8_0"])  # a quantized V cache is sized with flash attention only


def test_the_manifest_records_plans_for_both_cache_types(converted_phimoe):
    m = mf.load(converted_phimoe)
    for a in m.artifacts:
        assert {r.cache_type for r in a.plans} == {"f16", "q8_0"}
