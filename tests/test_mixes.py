"""Per-tensor types, named mixes, dry-run sizes and in-process importance matrices (issue 12)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moeprep import quants as mixes
from moeprep.cli import main
from moeprep.errors import MoeprepError
from moeprep.files import sha256_file
from moeprep.llama import imatrix as imatrix_file
from moeprep.quants import plan
from moeprep.records import manifest as mf
from moeprep.release import recipe
from moeprep.stages.quantize import quantize_model
from tests.llm import generate

ROOT = Path(__file__).resolve().parent.parent
MOE_Q4 = ["ffn_down_exps=Q5_K", "ffn_(gate|up|gate_up)_exps=Q4_K", "_shexp=Q8_0", "attn_=Q8_0", r"^output\.weight$=Q6_K"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def last_error(result) -> str:
    assert result.exit_code == 1, result.output
    return result.stderr.strip().splitlines()[-1]


def types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.fixture
def phimoe(converted_phimoe, tmp_path) -> Path:
    out = tmp_path / "phimoe"
    shutil.copytree(converted_phimoe, out)  # the session's conversion stays as it was
    return out


def test_quantize_tensor_type_rule_reaches_the_file_and_the_manifest(phimoe):
    f16 = phimoe / "tiny-phimoe-F16.gguf"
    assert types(phimoe / "tiny-phimoe-Q4_K_M.gguf")["blk.0.attn_q.weight"] == "Q4_K"  # the plain quant, before
    result = run("quantize", f16, "--quant", "Q4_K_M", "--tensor-type", "attn_.*=Q8_0", "--json")
    assert result.exit_code == 0, result.output
    [a] = json.loads(result.stdout)
    assert a["path"] == "tiny-phimoe-Q4_K_M.gguf" and a["settings"]["tensor_types"] == ["attn_.*=Q8_0"]
    made = types(phimoe / a["path"])
    attention = {n: t for n, t in made.items() if ".attn_" in n and n.endswith("weight") and "norm" not in n}
    assert len(attention) == 8 and set(attention.values()) == {"Q8_0"}
    assert made["blk.0.ffn_up_exps.weight"] == "Q4_K"  # the rest is Q4_K_M's own choice
    assert mf.load(phimoe).artifact("Q4_K_M").settings == mf.ArtifactSettings(ftype="Q4_K_M", tensor_types=["attn_.*=Q8_0"])
    again = run("quantize", f16, "--quant", "Q4_K_M", "--tensor-type", "attn_.*=Q8_0")
    assert again.exit_code == 0 and "quantizing" not in again.stderr  # same rules: up to date


def test_quantize_mix_dry_run_sizes_it_against_a_plain_quant_and_writes_nothing(phimoe):
    before = {p.name: p.stat().st_mtime_ns for p in phimoe.rglob("*")}
    f16 = phimoe / "tiny-phimoe-F16.gguf"
    result = run("quantize", f16, "--quant", "Q4_K_M", "--mix", "moe-q4", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny-phimoe-Q4_K_M.gguf: Q4_K_M, ") and "bits per weight" in lines[0]
    assert lines[2].startswith("tiny-phimoe-moe-q4.gguf: moe-q4 (Q4_K_M + 5 rules), ")
    assert lines[-1] == "sizes from llama.cpp's dry run; nothing written"
    assert "note: moe-q4: tiny-phimoe-F16.gguf has no shared experts (_shexp=Q8_0)" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in phimoe.rglob("*")} == before  # no file, no manifest, no lock

    sized = {s["quant"]: s for s in json.loads(run("quantize", f16, "--mix", "moe-q4", "--dry-run", "--json").stdout)}
    assert list(sized) == ["moe-q4"]  # --mix alone makes no default quants
    made = run("quantize", f16, "--mix", "moe-q4", "--json")
    assert made.exit_code == 0, made.output
    [a] = json.loads(made.stdout)
    assert (a["path"], a["quant"], a["settings"]["ftype"], a["settings"]["mix"]) == (
        "tiny-phimoe-moe-q4.gguf", "moe-q4", "Q4_K_M", "moe-q4")
    assert a["settings"]["tensor_types"] == MOE_Q4
    assert a["size"] == sized["moe-q4"]["bytes"]  # the dry run's size is the file's, to the byte
    t = types(phimoe / a["path"])
    assert (t["blk.1.ffn_down_exps.weight"], t["blk.1.ffn_gate_exps.weight"], t["blk.1.attn_v.weight"],
            t["output.weight"], t["blk.1.ffn_gate_inp.weight"]) == ("Q5_K", "Q4_K", "Q8_0", "Q6_K", "F32")
    assert mf.load(phimoe).artifact("moe-q4").path == "tiny-phimoe-moe-q4.gguf"
    assert len(generate(phimoe / a["path"])) == 8


def test_quantize_imatrix_in_process_reaches_the_quantizer(phimoe, tmp_path):
    f16 = phimoe / "tiny-phimoe-F16.gguf"
    imat = write_imatrix(tmp_path / "imatrix.gguf", f16)
    q2k = phimoe / "tiny-phimoe-Q2_K.gguf"  # made without one by the session's convert
    plain_types, plain_bytes = types(q2k), q2k.read_bytes()
    [sized] = json.loads(run("quantize", f16, "--quant", "Q2_K", "--imatrix", imat, "--dry-run", "--json").stdout)
    result = run("quantize", f16, "--quant", "Q2_K", "--imatrix", imat, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["size"] == sized["bytes"]  # the imatrix's metadata keys counted too
    assert json.loads(result.stdout)[0]["settings"]["imatrix"] == sha256_file(imat)
    # the same types, other bytes: the importance matrix changed how the quantizer rounded the rows
    assert types(q2k) == plain_types and q2k.read_bytes() != plain_bytes
    from gguf import GGUFReader

    meta = {k: f.contents() for k, f in GGUFReader(q2k).fields.items() if k.startswith("quantize.imatrix.")}
    assert meta == {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": "calibration.txt",
                    "quantize.imatrix.entries_count": 14, "quantize.imatrix.chunks_count": 3}


def test_mix_on_a_model_without_shared_experts_says_so_and_the_manifest_records_it(converted_local, tmp_path):
    out = tmp_path / "mixtral"
    shutil.copytree(converted_local["mixtral"], out)
    done = quantize_model(out, plan("tiny-mixtral", [], ["MOE-Q4"], ["token_embd=Q8_0", "nothing_here=Q4_0"]))
    assert done.made == ["tiny-mixtral-moe-q4.gguf"]
    assert done.notes == [
        "tensor-type rule nothing_here=Q4_0 matches no tensor llama.cpp quantizes in tiny-mixtral-F16.gguf; it changes nothing",
        "moe-q4: tiny-mixtral-F16.gguf has no shared experts (_shexp=Q8_0); that rule changes nothing"]
    a = mf.load(out).artifact("moe-q4")
    assert a.settings.tensor_types == ["token_embd=Q8_0", "nothing_here=Q4_0", *MOE_Q4]  # the user's first: they win
    assert types(out / a.path)["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("args, line", [
    (["--tensor-type", "attn_(=Q8_0"], "Error: tensor-type rule 'attn_(=Q8_0': bad pattern (missing ), unterminated "
                                       "subpattern at position 5) (PATTERN is a regular expression searched in each "
                                       "tensor name, e.g. 'attn_.*=Q8_0' or 'ffn_down_exps=Q5_K')"),
    (["--tensor-type", "attn_"], "Error: tensor-type rule 'attn_' is not PATTERN=TYPE (e.g. 'attn_.*=Q8_0' or "
                                 "'ffn_down_exps=Q5_K')"),
    (["--tensor-type", "attn_=Q9_K"], "Error: tensor-type rule 'attn_=Q9_K': unknown tensor type 'Q9_K' (tensor types: "),
    (["--tensor-type", "attn_=Q4_K_M"], "Error: tensor-type rule 'attn_=Q4_K_M': Q4_K_M is a file type, not a tensor "
                                        "type (tensor types: "),
    (["--tensor-type", "attn_=q8_k"], "Error: tensor-type rule 'attn_=q8_k': llama.cpp does not quantize to Q8_K"),
    (["--mix", "moe-q9"], "Error: unknown mix 'moe-q9' (moeprep ships moe-q4, moe-q3)"),
    (["--quant", "F16", "--tensor-type", "attn_=Q8_0"], "Error: tensor-type rules do nothing in a F16 file"),
    (["--tensor-type", "attn_=IQ2_XS"], "Error: Q8_0, Q4_K_M, Q2_K need an importance matrix, and llama.cpp refuses"),
])
def test_quantize_refuses_a_bad_rule_or_mix_in_one_line(args, line, tmp_path):
    (tmp_path / "x-F16.gguf").write_bytes(b"")  # refused before the file is read
    assert last_error(run("quantize", tmp_path / "x-F16.gguf", *args)).startswith(line)


def test_recipe_takes_a_mix_and_tensor_types(tmp_path):
    import yaml

    data = yaml.safe_load((ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml").read_text())
    data |= {"mix": "MOE-Q4", "tensor_types": ["token_embd=q8_0"], "quants": ["Q8_0", "IQ2_XS"],
             "imatrix": {"calibration": str(ROOT / "recipes" / "calibration" / "general-en.txt"),
                         "quants": ["IQ2_XS", "moe-q4"]}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    r = recipe.load(path)
    assert (r.mix, r.tensor_types, r.imatrix.quants) == (["moe-q4"], ["token_embd=Q8_0"], ["IQ2_XS", "moe-q4"])
    for change, message in [({"mix": ["moe-q9"]}, "mix: unknown mix 'moe-q9'"),
                            ({"tensor_types": ["attn_=Q9_K"]}, "tensor_types: tensor-type rule 'attn_=Q9_K': unknown"),
                            ({"tensor_types": ["attn_=IQ1_S"]}, "quants: Q8_0 need an importance matrix")]:
        path.write_text(yaml.safe_dump(data | change))
        with pytest.raises(MoeprepError) as e:
            recipe.load(path)
        assert e.value.message.startswith(f"{path}: {message}"), e.value.message


# --- reading an imatrix as llama-quantize does -----------------------------------------------------------

def write_imatrix(path: Path, model: Path | None = None, entries: dict | None = None, metadata: bool = True) -> Path:
    """An imatrix GGUF laid out as llama-imatrix writes one: <tensor>.in_sum2 (ne0 x experts), <tensor>.counts."""
    from gguf import GGUFReader, GGUFWriter

    if entries is None:
        rng = np.random.default_rng(0)
        entries = {}
        for t in GGUFReader(model).tensors:
            if mixes.quantizable(t.name, len(t.shape)) and t.name != "token_embd.weight" and t.name != "output.weight":
                n = int(t.shape[2]) if len(t.shape) == 3 else 1
                entries[t.name] = (rng.uniform(0.01, 50, (n, int(t.shape[0]))).astype(np.float32),
                                   rng.integers(1, 500, (n, 1)).astype(np.float32))
    w = GGUFWriter(path, arch=None)
    w.add_type("imatrix")
    if metadata:
        w.add_array("imatrix.datasets", ["/somewhere/local/calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 3)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_load_divides_each_expert_by_its_count(tmp_path):
    sums = np.array([[2.0, 4.0, 6.0], [1.0, 1.0, 1.0], [9.0, 3.0, 0.0]], dtype=np.float32)
    counts = np.array([[2.0], [0.0], [3.0]], dtype=np.float32)  # an expert that saw no token gets 1s
    path = write_imatrix(tmp_path / "i.gguf", entries={"blk.0.ffn_up_exps.weight": (sums, counts)})
    got = imatrix_file.load(path)
    assert (got.file, got.datasets, got.chunk_count) == ("i.gguf", ["/somewhere/local/calibration.txt"], 3)
    assert got.entries["blk.0.ffn_up_exps.weight"].tolist() == [1, 2, 3, 1, 1, 1, 3, 1, 0]


def test_imatrix_load_reads_the_legacy_dat_format(tmp_path):
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 2)
    data += struct.pack("<2f", 8.0, 2.0) + struct.pack("<ii", 7, 4) + b"wiki"
    (tmp_path / "i.dat").write_bytes(data)
    got = imatrix_file.load(tmp_path / "i.dat")
    assert got.entries == {"blk.0.attn_q.weight": pytest.approx(np.array([2.0, 0.5]))}
    assert (got.datasets, got.chunk_count) == (["wiki"], 7)


def test_imatrix_load_refuses_what_llama_quantize_refuses(tmp_path, converted_phimoe):
    one = {"a.weight": (np.ones((1, 4), np.float32), np.ones((1, 1), np.float32))}
    with pytest.raises(MoeprepError, match="is not an importance matrix from llama-imatrix"):
        imatrix_file.load(write_imatrix(tmp_path / "bare.gguf", entries=one, metadata=False))
    with pytest.raises(MoeprepError, match="is not an importance matrix from llama-imatrix"):
        imatrix_file.load(converted_phimoe / "tiny-phimoe-F16.gguf")  # a model, not an imatrix
    (tmp_path / "short.dat").write_bytes(struct.pack("<i", 3))
    with pytest.raises(MoeprepError, match="neither a GGUF nor a legacy imatrix"):
        imatrix_file.load(tmp_path / "short.dat")


def test_tensor_types_name_the_ggml_types_of_the_linked_llama_cpp():
    """gguf-py's numbering is what tt_overrides carries: each name must be the linked ggml's own for that number."""
    import ctypes

    from gguf import GGMLQuantizationType
    from llama_cpp import llama_cpp

    name_of = llama_cpp._lib.ggml_type_name
    name_of.restype, name_of.argtypes = ctypes.c_char_p, [ctypes.c_int]
    for kind in mixes.TENSOR_TYPES:
        assert name_of(GGMLQuantizationType[kind].value).decode().upper() == kind
    for mix in mixes.MIXES.values():
        assert all(mixes.parse(str(rule)) == rule for rule in mix.rules)


def test_imatrix_reports_experts_a_short_text_never_reached(converted_phimoe, tmp_path):
    """One chunk of one repeated word: the router sends nearly every token to the same few experts. The coverage
    moeprep prints and records is the imatrix file's own per-expert counts."""
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["the"] * 70) + "\n")
    out = tmp_path / "imatrix.gguf"
    result = run("imatrix", converted_phimoe / "tiny-phimoe-F16.gguf", "--text", text, "--ctx", "32", "--chunks", "1",
                 "--out", out)
    assert result.exit_code == 0, result.output
    from gguf import GGUFReader

    counts = {t.name.removesuffix(".counts"): [int(round(float(c))) for c in t.data.ravel()]
              for t in GGUFReader(out).tensors if t.name.endswith(".counts")}
    blk0 = next(v for k, v in counts.items() if k.startswith("blk.0.ffn_") and "_exps" in k)
    missing = [e for e, n in enumerate(blk0) if n == 0]
    assert missing, "a repeated word should leave some experts of block 0 without tokens"
    assert f"blk.0: {len(blk0) - len(missing)}/{len(blk0)} experts received tokens" in result.stdout
    assert "received no calibration tokens" in result.stdout and "warning:" in result.stderr
