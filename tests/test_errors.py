"""User errors: one line naming what failed and what to do next, exit code 1, no traceback."""

import shutil
from collections import namedtuple

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.errors import MoeprepError


def run(*args):
    return CliRunner().invoke(main, list(args))


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # status lines may come before it
    return errors[0]


def test_errors_unknown_repo(hub, tmp_path):
    line = one_line_error(run("convert", "nobody/nothing", "--out", str(tmp_path)))
    assert line == f"Error: repo nobody/nothing not found on {hub.url} (check the id; if it is private, " \
                   "set HF_TOKEN to a token that can read it)"


def test_errors_unknown_revision(hub, tmp_path):
    line = one_line_error(run("download", "some-org/tiny-phimoe", "--revision", "v9.9"))
    assert line.startswith("Error: revision 'v9.9' not found in some-org/tiny-phimoe")


def test_errors_gated_repo_without_token(hub, tmp_path):
    line = one_line_error(run("convert", "gated-org/tiny-gated", "--out", str(tmp_path)))
    assert line == f"Error: gated-org/tiny-gated is a gated repo and no Hugging Face token is set " \
                   f"(accept its terms at {hub.url}/gated-org/tiny-gated, then set HF_TOKEN or run `hf auth login`)"


def test_errors_gated_repo_token_without_access_is_never_shown(hub, tmp_path, monkeypatch):
    secret = "hf_not_granted_SECRET_4242"
    monkeypatch.setenv("HF_TOKEN", secret)
    result = run("download", "gated-org/tiny-gated")
    line = one_line_error(result)
    assert "this token has no access" in line
    assert secret not in result.output
    assert any(auth == f"Bearer {secret}" for _, _, auth in hub.requests), "the token was not sent to the Hub"


def test_errors_gated_repo_with_access_converts_and_keeps_the_token_secret(hub, tmp_path, granted_token):
    out = tmp_path / "gated"
    result = run("convert", "gated-org/tiny-gated", "--out", str(out), "--quant", "Q8_0", "--json")
    assert result.exit_code == 0, result.output
    assert granted_token not in result.output
    for path in out.rglob("*"):
        if path.is_file():
            assert granted_token.encode() not in path.read_bytes(), path


def test_errors_sha256_mismatch_is_an_error(hub):
    line = one_line_error(run("download", "some-org/tiny-liar"))
    assert line.startswith("Error: some-org/tiny-liar/model-00002-of-00002.safetensors does not match "
                           "the sha256 the Hub advertises (got ")


def test_errors_unsupported_architecture_names_it_and_lists_moe_ones(hub, tmp_path):
    line = one_line_error(run("convert", "microsoft/GRIN-MoE", "--out", str(tmp_path)))
    assert line.startswith("Error: architecture GRINMoEForCausalLM is not supported by convert_hf_to_gguf "
                           "(it needs custom code, which moeprep never runs; supported MoE architectures: ")
    for arch in ("PhiMoEForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
                 "GptOssForCausalLM"):
        assert arch in line
    assert "LlamaForCausalLM" not in line
    assert not list(tmp_path.glob("*.gguf*"))


def test_errors_corrupt_safetensors(checkpoints, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(checkpoints["mixtral"], src)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100_000])
    line = one_line_error(run("convert", str(src), "--out", str(tmp_path / "out")))
    assert line.startswith("Error: model-00002-of-00002.safetensors is not a valid safetensors file (")
    assert not list((tmp_path / "out").glob("*.gguf*"))


def test_errors_not_enough_disk_is_checked_before_any_download(hub, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    hub.requests.clear()
    line = one_line_error(run("convert", "some-org/tiny-mixtral", "--out", str(tmp_path / "out")))
    assert line.startswith("Error: not enough free disk in ")
    assert "needed, 1000 B free (free some space or choose another directory with --out)" in line
    assert not [r for r in hub.requests if "/resolve/" in r[1]], "bytes moved before the disk check"


def test_errors_not_enough_disk_for_local_outputs(checkpoints, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    line = one_line_error(run("convert", str(checkpoints["mixtral"]), "--out", str(tmp_path / "out")))
    assert "for the F16 and 3 quants" in line
    assert not list((tmp_path / "out").glob("*.gguf*"))


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_errors_unknown_quant_type(command, tmp_path, checkpoints):
    target = str(checkpoints["mixtral"]) if command == "convert" else str(tmp_path / "x-F16.gguf")
    line = one_line_error(run(command, target, "--quant", "Q9_X", "--out", str(tmp_path)) if command == "convert"
                          else run(command, target, "--quant", "Q9_X"))
    assert line.startswith("Error: unknown quant type 'Q9_X' (choose from ")
    assert "Q4_K_M" in line and "IQ4_XS" in line


@pytest.mark.parametrize("quant", ["IQ2_XS", "Q2_K_S", "iq1_s"])
def test_errors_imatrix_quants_are_refused_up_front(quant, checkpoints, tmp_path):
    line = one_line_error(run("convert", str(checkpoints["mixtral"]), "--quant", quant, "--out", str(tmp_path)))
    assert f"{quant.upper()} needs an importance matrix" in line


def test_errors_source_neither_folder_nor_repo(tmp_path):
    line = one_line_error(run("convert", "not a repo", "--out", str(tmp_path)))
    assert line == "Error: not a repo is neither a model directory nor a Hub repo id (pass org/name or a folder)"


def test_errors_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "probe", str(tmp_path / "missing.gguf"))
    assert result.exit_code == 1
    assert isinstance(result.exception, MoeprepError)


def test_errors_not_enough_disk_for_a_download_alone(hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    hub.requests.clear()
    line = one_line_error(run("download", "some-org/tiny-dense"))
    assert line.startswith("Error: not enough free disk in ") and "for the download of some-org/tiny-dense" in line
    assert not [r for r in hub.requests if "/resolve/" in r[1]], "bytes moved before the disk check"


def test_errors_dense_model_is_said_before_any_weight_moves(hub, tmp_path):
    """config.json comes first: the architecture is checked, and a dense model announced, before the weights."""
    hub.requests.clear()
    result = run("convert", "some-org/tiny-dense", "--out", str(tmp_path / "dense"), "--quant", "Q8_0")
    assert result.exit_code == 0, result.output
    note = "note: some-org/tiny-dense is a dense model: --cpu-moe and --n-cpu-moe will change nothing"
    assert note in result.stderr and result.stderr.index(note) < result.stderr.index("converting ")
    fetched = [r[1] for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert fetched[0].endswith("/config.json") and any(p.endswith(".safetensors") for p in fetched[1:])
