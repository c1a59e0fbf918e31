"""The demo's trained model: training lowers the loss, is deterministic, and is cached.

These tests train with a short schedule (a few seconds) in a cache of their own. The demo's real schedule
trains once per machine into the user's cache, where test_cli_demo_runs_the_main_job finds it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.demo import train
from moeprep.demo.run import checkpoint

SHORT = train.Schedule(steps=10, batch=4, seq=64, warmup=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def short(cache) -> train.Trained:
    return train.trained("phimoe", SHORT, cache=cache)


def _weights(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_demo_training_lowers_the_loss(short):
    assert not short.cached
    assert 6.5 < short.loss_before < 7.5  # random weights: about ln(1024), the tokenizer's size
    assert short.loss_after < 0.9 * short.loss_before  # 10 steps; the demo's 120 reach about 0.3
    record = json.loads((short.path / train.RECORD).read_text())
    assert record["key"] == short.key and record["schedule"]["steps"] == 10
    assert json.loads((short.path / "config.json").read_text())["architectures"] == ["PhiMoEForCausalLM"]
    assert not list(short.path.parent.glob("*.partial*"))


def test_demo_training_is_cached(short, cache):
    before = {p.name: p.stat().st_mtime_ns for p in short.path.iterdir()}
    again = train.trained("phimoe", SHORT, cache=cache, status=lambda line: pytest.fail(f"said {line!r}"))
    assert again.cached and again.path == short.path and again.loss_after == short.loss_after
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == before
    other = train.key("phimoe", train.Schedule(steps=11, batch=4, seq=64, warmup=2), "text")
    assert other != train.key("phimoe", SHORT, "text") != train.key("phimoe", SHORT, "other text")


def test_demo_training_is_deterministic(short, tmp_path):
    again = train.trained("phimoe", SHORT, cache=tmp_path)
    assert not again.cached and again.key == short.key
    assert _weights(again.path) == _weights(short.path)
    assert (again.path / "tokenizer.model").read_bytes() == (short.path / "tokenizer.model").read_bytes()


def test_demo_checkpoint_replaces_a_random_one(short, cache, checkpoints, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(train, "DEFAULT", SHORT)
    monkeypatch.setenv("MOEPREP_CACHE", str(cache))
    shutil.copytree(checkpoints["phimoe"], tmp_path / "tiny-phimoe")  # what an older demo left: random weights
    said = []
    source = checkpoint("phimoe", tmp_path, said.append)
    assert source == tmp_path / "tiny-phimoe" and any(line.startswith("copying the trained") for line in said)
    assert _weights(source) == _weights(short.path)
    said.clear()
    assert checkpoint("phimoe", tmp_path, said.append) == source and said == []  # current: nothing copied


def test_demo_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MOEPREP_CACHE", str(tmp_path / "file"))
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write the demo's model cache at {tmp_path / 'file' / 'demo'}: Not a directory "
        "(set MOEPREP_CACHE to a writable folder)")
