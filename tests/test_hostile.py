"""What a hostile probe of the boundary found, each turned into the behaviour it should have had: links and FIFOs
planted where moeprep writes, names that cannot name files, GGUF headers that would abort llama.cpp, inputs that
would hang or flood a read, cards that pass their lint while a reader sees something else, bytes pushed that the
manifest does not name, and error lines a path could split."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moeprep.card.sourcecard import parse as parse_readme
from moeprep.cli import main
from moeprep.errors import IntegrityError, MoeprepError
from moeprep.files import open_log, write_aside
from moeprep.ggufio.probe import probe
from moeprep.lock import LOCK, locked
from moeprep.records import manifest as mf
from moeprep.release import recipe
from tests import ggufs
from tests.test_error_catalogue import linked_copy

ROOT = Path(__file__).resolve().parent.parent
TINY_RECIPE = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# --- links and FIFOs where moeprep writes ----------------------------------------------------------------------

def test_a_hard_linked_lock_file_is_refused_and_its_other_name_keeps_its_bytes(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (tmp_path / "out").mkdir()
    os.link(outside, tmp_path / "out" / LOCK)
    with pytest.raises(MoeprepError, match="a hard link to another file"), locked(tmp_path / "out"):
        pass
    assert outside.read_text() == "precious\n"


def test_a_fifo_in_the_locks_place_is_refused_without_hanging(tmp_path):
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / LOCK)
    with pytest.raises(MoeprepError, match="not a regular file"), locked(tmp_path / "out"):
        pass


def test_a_log_replaces_a_hard_link_or_a_fifo_without_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (tmp_path / "out" / "logs").mkdir(parents=True)
    os.link(outside, tmp_path / "out" / "logs" / "a.log")
    os.mkfifo(tmp_path / "out" / "logs" / "b.log")
    for name in ("a.log", "b.log"):
        done = threading.Event()

        def write(name=name, done=done):
            with open_log(tmp_path / "out" / "logs" / name, root=tmp_path / "out") as f:
                f.write("the converter's log\n")
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(10), f"opening {name} hung"
        assert (tmp_path / "out" / "logs" / name).read_text() == "the converter's log\n"
    assert outside.read_text() == "precious\n"


def test_a_planted_directory_where_a_partial_file_goes_is_refused_not_deleted(tmp_path):
    planted = tmp_path / "README.md.partial" / "important"
    planted.mkdir(parents=True)
    (planted / "file").write_text("keep\n")
    with pytest.raises(MoeprepError, match="is a directory"), write_aside(tmp_path / "README.md") as tmp:
        tmp.write_text("card")
    assert (planted / "file").read_text() == "keep\n"


def test_imatrix_out_must_name_a_gguf_in_an_existing_directory(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    f16 = d / "tiny-phimoe-F16.gguf"
    text = ROOT / "recipes" / "calibration" / "general-en.txt"
    for out, message in [(d / "README.md", "is not a .gguf file name"), (d / LOCK, "is not a .gguf file name"),
                         (d / "sub" / "dir" / "x.gguf", "is not a directory")]:
        assert message in error_line(run("imatrix", f16, "--text", text, "--out", out))
    assert not (d / "sub").exists()


# --- names that cannot name files ------------------------------------------------------------------------------

def test_a_model_directory_whose_name_cannot_name_files_is_refused_before_work(checkpoints, tmp_path):
    for name in ("my model", "-rf", "модель"):
        src = tmp_path / name
        shutil.copytree(checkpoints["phimoe"], src)
        line = error_line(run("convert", src, "--out", tmp_path / "out"))
        assert "which cannot name its files" in line
        assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["../../../escape", "a/b", "--help", "x" * 400, "two\nlines"])
def test_a_recipe_name_that_cannot_name_files_is_refused(name, tmp_path):
    data = yaml.safe_load(TINY_RECIPE.read_text()) | {"name": name}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MoeprepError, match="name: the recipe gives the model name"):
        recipe.load(path)


def test_a_manifest_path_longer_than_a_file_system_allows_is_refused(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    data = json.loads((d / "manifest.json").read_text())
    data["artifacts"][1]["path"] = "x" * 5000 + ".gguf"
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MoeprepError, match="is not a GGUF file name inside the directory"):
        mf.load(d)


# --- GGUF headers that would abort llama.cpp --------------------------------------------------------------------

def crafted(path: Path, **kv) -> Path:
    """A two-block MoE header (sparse: no weights) with `kv` over sensible values."""
    n, heads, experts, ff = 256, 4, 4, 128
    tensors: dict[str, tuple[int, ...]] = {"token_embd.weight": (ggufs.VOCAB, n), "output_norm.weight": (n,),
                                           "output.weight": (ggufs.VOCAB, n)}
    for b in range(2):
        p = f"blk.{b}."
        tensors |= {p + "attn_norm.weight": (n,), p + "attn_q.weight": (n, n), p + "attn_k.weight": (n, n),
                    p + "attn_v.weight": (n, n), p + "attn_output.weight": (n, n), p + "ffn_norm.weight": (n,),
                    p + "ffn_gate_inp.weight": (experts, n), p + "ffn_gate_exps.weight": (experts, ff, n),
                    p + "ffn_up_exps.weight": (experts, ff, n), p + "ffn_down_exps.weight": (experts, n, ff)}
    header = {"block_count": 2, "context_length": 4096, "embedding_length": n, "feed_forward_length": ff,
              "attention.head_count": heads, "attention.head_count_kv": heads, "expert_count": experts,
              "expert_used_count": 2, "attention.layer_norm_rms_epsilon": 1e-5}
    return ggufs.sparse(path, "llama", header | kv, tensors)


@pytest.mark.parametrize(("kv", "message"), [
    ({"expert_used_count": 100000}, "routes each token to 100000 of its 4 experts"),
    ({"expert_used_count": 0}, "routes each token to 0 of its 4 experts"),
    ({"expert_count": 2000}, "claims 2000 experts"),
    ({"attention.head_count": 0}, "0 attention heads"),
    ({"context_length": 4_000_000_000}, "claims a trained context of 4000000000 tokens"),
])
def test_a_header_llama_cpp_would_abort_on_is_refused_by_the_probe(kv, message, tmp_path):
    path = crafted(tmp_path / "x.gguf", **kv)
    with pytest.raises(IntegrityError, match=message):
        probe(path)
    assert message in error_line(run("plan", path))


def test_a_count_given_as_text_is_one_error_line(tmp_path):
    import gguf

    path = crafted(tmp_path / "x.gguf")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "y.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "llama.block_count":
            writer.add_string(field.name, "two")
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(tmp_path / "y.gguf", "r+b") as f:
        f.truncate(os.path.getsize(path) * 2)
    assert "gives llama.block_count as 'two', not a count" in error_line(run("probe", tmp_path / "y.gguf"))


# --- reads that would hang or flood -----------------------------------------------------------------------------

def test_smoke_refuses_a_reference_that_is_not_a_regular_file(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    os.mkfifo(tmp_path / "fifo")
    for ref in ("/dev/zero", tmp_path / "fifo"):
        assert "is not a regular file" in error_line(run("smoke", d, "--reference", ref, "--placement", "gpu"))


def test_smoke_refuses_a_reference_other_than_the_directorys_converted_file(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    other = tmp_path / "other-F16.gguf"
    shutil.copy(d / "tiny-phimoe-Q8_0.gguf", other)
    line = error_line(run("smoke", d, "--reference", other, "--placement", "gpu", "--runs", "1"))
    assert "is not tiny-phimoe-F16.gguf, the converted file the manifest" in line
    line = error_line(run("smoke", d / "tiny-phimoe-Q2_K.gguf", "--reference", other, "--placement", "gpu"))
    assert "is not tiny-phimoe-F16.gguf" in line


def test_a_recipe_is_checked_whole_as_it_loads(tmp_path):
    base = TINY_RECIPE.read_text()
    path = tmp_path / "r.yaml"
    cases = [
        (base + "\nname: again\n", "is given twice"),
        (yaml.safe_dump(yaml.safe_load(base) | {"expect": {"expert_count": 10**26}}), "expect.expert_count must be "
                                                                                        "at most 1024"),
        (yaml.safe_dump(yaml.safe_load(base) | {"card": {"template": "/dev/zero"}}),
         "card.template: card template /dev/zero is not a regular file"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(MoeprepError) as e:
            recipe.load(path)
        assert message in e.value.message, e.value.message


def test_a_shard_size_that_would_make_thousands_of_files_is_refused(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    line = error_line(run("card", d, "--max-shard", "1B"))
    assert "would split a file into" in line
    assert not list(d.glob("*/*.gguf"))


# --- cards that pass their lint while a reader sees something else ------------------------------------------------

def test_card_refuses_ids_that_are_not_repo_ids(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    for option, value in [("--base-model", "org/x\n\n<script>alert(1)</script>"),
                          ("--base-model", "org/x](https://evil.example/phish) and [more"),
                          ("--repo-id", "../../x"), ("--repo-id", "x" * 5000)]:
        line = error_line(run("card", d, "--repo-id", "me/x-GGUF", option, value))
        assert "is not a Hub repo id" in line and len(line) < 200


def test_a_source_readme_reaches_the_card_as_plain_words():
    card = parse_readme("---\nlicense: apache-2.0 <b>x</b>\nlicense_link: https://evil.example/a b\n"
                        "language: [en, '<script>']\n---\nGreat model <img src=x onerror=alert(1)> see "
                        "[docs](https://evil.example/phish) <!-- hidden --> end\n")
    assert (card.license, card.license_link, card.language) == (None, None, ["en"])
    assert card.description == "Great model see docs end"
    assert parse_readme("A <b>bold</b> claim, [a link](x), `code` and # not a heading").description == \
        "A bold claim, a link, \\`code\\` and \\# not a heading"


@pytest.fixture
def carded(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "carded")
    assert run("card", d, "--repo-id", "me/tiny-phimoe-GGUF", "--base-model", "org/tiny-phimoe").exit_code == 0
    return d


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("license: mit\n", "license: apache-2.0\nlicense: mit\n", 1),  # a key given twice
    lambda t: t.replace("\n| File |", "\n> | File |", 1),  # a table put in a quote
    lambda t: t + "\n[//]: # (This model contains a backdoor)\n",  # a link reference a reader never sees
    lambda t: t.replace("| Architecture |", "| Architecture | EVIL extra cell |", 1),  # a cell past the header
    lambda t: t.replace("|---|", "|---:|", 1),  # a column's alignment
])
def test_lint_catches_edits_the_blocks_do_not_show(carded, edit):
    card = carded / "README.md"
    text = card.read_text()
    edited = edit(text)
    assert edited != text, "the edit must apply to the card"
    card.write_text(edited)
    result = run("card", "--check", card)
    assert result.exit_code == 1, result.output


def test_lint_does_not_read_a_template_the_manifest_names_without_its_sha256(carded, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret-token-ABC123\n")
    data = json.loads((carded / "manifest.json").read_text())
    data["card"]["template"], data["card"]["template_sha256"] = str(secret), None
    (carded / "manifest.json").write_text(json.dumps(data))
    result = run("card", "--check", carded / "README.md")
    assert result.exit_code == 1 and "secret-token" not in result.output + result.stderr
    assert "without its sha256" in result.output


def test_a_template_that_is_not_utf8_is_one_error_line(converted_phimoe, tmp_path):
    d = linked_copy(converted_phimoe, tmp_path / "out")
    (tmp_path / "t.j2").write_bytes(b"\xff\xfe bad")
    assert "card template" in error_line(run("card", d, "--template", tmp_path / "t.j2"))


# --- pushed bytes are the manifest's -----------------------------------------------------------------------------

def test_push_refuses_a_file_rewritten_under_its_recorded_size_and_time(hub, write_token, carded):
    path = carded / "tiny-phimoe-Q2_K.gguf"
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.unlink()  # a hard link to the session's file: write a new one
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    hub.requests.clear()
    line = error_line(run("push", carded, "--repo-id", "me/tiny-phimoe-GGUF"))
    assert "tiny-phimoe-Q2_K.gguf is not the bytes the manifest lists" in line
    assert not [r for r in hub.requests if r[0] in ("PUT", "POST")]


# --- one error line ---------------------------------------------------------------------------------------------

def test_a_path_cannot_split_or_forge_the_error_line(tmp_path):
    line = error_line(run("probe", "nonexist\nError: everything is fine.gguf"))
    assert "\\n" in line
    assert "File name too long" in error_line(run("probe", tmp_path / ("a" * 300 + ".gguf")))


def test_an_unknown_option_is_one_error_line():
    assert error_line(run("--bogus")) == "Error: No such option '--bogus' (see `moeprep --help`)"
    assert error_line(run("plan", "--tiers=-8", "x.gguf")).startswith("Error: No such option '-8'")
