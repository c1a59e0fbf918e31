"""Recipe loading: every bad value is one MoeprepError naming the file and the key, raised when the recipe loads."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.errors import MoeprepError
from moeprep.release import recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml"
CALIBRATION = ROOT / "recipes" / "calibration" / "general-en.txt"


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def refusal(path: Path) -> MoeprepError:
    with pytest.raises(MoeprepError) as e:
        recipe.load(path)
    return e.value


def tiny(**change) -> dict:
    return yaml.safe_load(TINY.read_text()) | change


HUB = {"repo_id": "me/x"}


@pytest.mark.parametrize("change, message, hint", [
    ({"hub": HUB | {"max_shard": "1.2.3GB"}}, "hub.max_shard: cannot read '1.2.3GB' as a size", "24GiB"),
    ({"hub": HUB | {"max_shard": "0GB"}}, "hub.max_shard: size '0GB' is zero", "positive"),
    ({"hub": HUB | {"max_shard": 0}}, "hub.max_shard: cannot read '0' as a size", "add a unit"),
    ({"hub": HUB | {"max_shard": 50}}, "hub.max_shard: cannot read '50' as a size", "add a unit: 50GiB or 50GB"),
    ({"smoke": {"runs": 0}}, "smoke.runs must be at least 1 (got 0)", "fix the recipe"),
    ({"smoke": {"tokens": 0}}, "smoke.tokens must be at least 2 (got 0)", "fix the recipe"),
    ({"smoke": {"tokens": 1}}, "smoke.tokens must be at least 2 (got 1)", "fix the recipe"),
    ({"smoke": {"ctx": -5}}, "smoke.ctx must be at least 64 (got -5)", "fix the recipe"),
    ({"smoke": {"ctx": 4096.0}}, "smoke.ctx must be an integer, not float 4096.0", "fix the recipe"),
    ({"smoke": {"placements": ["n-cpu-moe=99999999999"]}}, "smoke.placements[0]: placement 'n-cpu-moe=99999999999'",
     "n-cpu-moe=1..1024"),
    ({"smoke": {"placements": ["gpu", "n-cpu-moe=0"]}}, "smoke.placements[1]: placement 'n-cpu-moe=0'", "gpu"),
    ({"smoke": {"placements": ["gpu", 5]}}, "smoke.placements[1] must be a string, not int 5", "fix the recipe"),
    ({"hub": {"repo_id": "no-slash"}}, "hub.repo_id: 'no-slash' is not a Hub repo id", "ORG/NAME"),
    ({"source": {"repo": "a/../b"}}, "source.repo: 'a/../b' is not a Hub repo id", "ORG/NAME"),
    ({"hub": HUB | {"layout": "split"}}, "hub.layout must be 'single' or 'per-quant', not 'split'", "fix the recipe"),
    ({"outtype": "q8_0"}, "outtype must be 'f16', 'bf16' or 'f32', not 'q8_0'", "fix the recipe"),
    ({"hub": None}, "hub must be a mapping, not nothing", "fix the recipe"),
    ({"expect": {"expert_count": 0}}, "expect.expert_count must be at least 1 (got 0)", "fix the recipe"),
    ({"imatrix": {"calibration": str(CALIBRATION), "quants": ["Q2_K"], "ctz": 512}}, "imatrix: unknown key 'ctz'",
     "known keys: calibration, chunks, ctx, quants"),
    ({"imatrix": {"calibration": str(CALIBRATION), "quants": ["Q4_0"]}},
     "imatrix.quants: names Q4_0, which quants does not list", "list every imatrix quant under quants too"),
    ({"imatrix": {"calibration": "missing.txt", "quants": ["Q2_K"]}}, "imatrix.calibration: ", "relative to the recipe"),
    ({"imatrix": {"quants": ["Q2_K"]}}, "imatrix: missing key 'calibration'", "add it"),
    ({"path": "elsewhere.yaml"}, "unknown key 'path'", "known keys: card, expect, hub, imatrix, mix, name, outtype"),
    ({"source": {"repo": "a/b", "revision": 20240101}}, "source.revision must be a string, not int 20240101", "fix"),
])
def test_recipe_refuses_a_bad_value_when_it_loads(change, message, hint, tmp_path):
    path = write(tmp_path, tiny(**change))
    e = refusal(path)
    assert e.message.startswith(f"{path}: {message}"), e.message
    assert hint in e.hint


def test_recipe_reads_a_key_yaml_takes_for_a_number_as_unknown(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY.read_text() + "smoke2: 1\n1: x\n")
    e = refusal(path)
    assert e.message.startswith(f"{path}: unknown key ") and "known keys: card" in e.hint


def test_recipe_normalises_quants_and_placements(tmp_path):
    data = tiny(quants=["q8_0", "Q8_0", "iq2_xs"], smoke={"placements": ["gpu", " n-cpu-moe=016 "]},
                imatrix={"calibration": str(CALIBRATION), "quants": ["iq2_XS"]})
    r = recipe.load(write(tmp_path, data))
    assert r.quants == ["Q8_0", "IQ2_XS"] and r.imatrix.quants == ["IQ2_XS"]
    assert r.smoke.placements == ["gpu", "n-cpu-moe=16"]


def test_recipe_fills_defaults_and_knows_its_path(tmp_path):
    path = write(tmp_path, {"name": "x", "source": {"repo": "org/x"}, "hub": {"repo_id": "me/x-GGUF"}})
    r = recipe.load(path)
    assert r.path == path and r.relative("cal.txt") == tmp_path / "cal.txt"
    assert (r.source.revision, r.outtype, r.quants, r.imatrix) == ("main", "f16", ["Q8_0", "Q4_K_M", "Q2_K"], None)
    assert (r.hub.layout, r.hub.max_shard, r.hub.max_shard_bytes, r.hub.private) == ("single", "50GB", 50 * 10**9, False)
    assert (r.smoke.placements, r.smoke.ctx, r.smoke.runs, r.smoke.tokens) == (["gpu", "cpu-moe"], 4096, 3, 64)
    assert r.card.quantized_by == "moeprep" and r.expect.expert_count is None


def test_recipe_max_shard_keeps_the_text_as_written(tmp_path):
    r = recipe.load(write(tmp_path, tiny(hub=HUB | {"max_shard": "8000MiB"})))
    assert r.hub.max_shard == "8000MiB" and r.hub.max_shard_bytes == 8000 * 2**20


def test_recipe_load_refuses_a_directory():
    e = refusal(ROOT / "recipes")
    assert e.message == f"{ROOT / 'recipes'} is a directory"
    assert e.hint.startswith("give one recipe file, e.g. ") and e.hint.endswith(".yaml")


@pytest.mark.parametrize("text, held", [("", "nothing"), ("- a\n- b\n", "a list"), ("just words\n", "a str")])
def test_recipe_load_refuses_yaml_that_is_not_a_mapping(text, held, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert refusal(path).message == f"{path} holds {held}, not recipe keys"


def test_recipe_load_refuses_a_file_that_is_not_text(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert refusal(path).message == f"recipe {path} is not UTF-8 text"


def test_recipe_release_of_a_directory_is_one_line():
    result = CliRunner().invoke(main, ["release", str(ROOT / "recipes"), "--dry-run"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        f"Error: {ROOT / 'recipes'} is a directory (give one recipe file, e.g. {ROOT / 'recipes' / 'deepseek-moe-16b-base.yaml'})"]
