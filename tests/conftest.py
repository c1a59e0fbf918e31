"""Shared fixtures: an isolated HF home, the local Hub server, tiny checkpoints and their conversions.

huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported, so both are set here, before
any test module imports it. Nothing in the suite touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="moeprep-tests-"))
for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
    os.environ.pop(var, None)
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["MOEPREP_NO_PROGRESS"] = "1"

from tests.hub_server import GRANTED_TOKEN, WRITE_TOKEN, HubServer, repo_from_folder  # noqa: E402

HUB = HubServer()
os.environ["HF_ENDPOINT"] = HUB.url


def pytest_sessionfinish(session, exitstatus):
    HUB.stop()
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoints: phimoe (Phi-3.5-MoE-shaped), mixtral and a dense llama."""
    from moeprep.demo.model import KINDS, build

    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: build(kind, root / f"tiny-{kind}") for kind in KINDS}


@pytest.fixture(scope="session")
def grin_checkpoint(tmp_path_factory, checkpoints) -> Path:
    """GRIN-MoE's custom-code architecture: config names GRINMoEForCausalLM with an auto_map."""
    folder = tmp_path_factory.mktemp("grin") / "GRIN-MoE"
    shutil.copytree(checkpoints["phimoe"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["GRINMoEForCausalLM"], model_type="grinmoe",
                  auto_map={"AutoConfig": "configuration_grinmoe.GRINMoEConfig",
                            "AutoModelForCausalLM": "modeling_grinmoe.GRINMoEForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def hub(checkpoints, grin_checkpoint) -> HubServer:
    HUB.repos.update({
        "some-org/tiny-phimoe": repo_from_folder(checkpoints["phimoe"]),
        "some-org/tiny-mixtral": repo_from_folder(checkpoints["mixtral"]),
        "gated-org/tiny-gated": repo_from_folder(checkpoints["mixtral"], gated=True),
        "microsoft/GRIN-MoE": repo_from_folder(grin_checkpoint),
        "some-org/tiny-dense": repo_from_folder(checkpoints["llama"]),  # never downloaded but by one test
    })
    liar = repo_from_folder(checkpoints["mixtral"])
    liar.advertised_sha256["model-00002-of-00002.safetensors"] = "0" * 64
    HUB.repos["some-org/tiny-liar"] = liar
    HUB.start()
    return HUB


@pytest.fixture
def granted_token(monkeypatch) -> str:
    monkeypatch.setenv("HF_TOKEN", GRANTED_TOKEN)
    return GRANTED_TOKEN


@pytest.fixture(scope="session")
def converted_phimoe(hub, tmp_path_factory) -> Path:
    """`moeprep convert some-org/tiny-phimoe` through the local Hub, once for the session."""
    from click.testing import CliRunner

    from moeprep.cli import main

    out = tmp_path_factory.mktemp("convert") / "tiny-phimoe-GGUF"
    result = CliRunner().invoke(main, ["convert", "some-org/tiny-phimoe", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def smoked(converted_phimoe, tmp_path_factory):
    """`moeprep smoke DIR --json` on a copy of the converted tiny Phi-MoE, once for the session."""
    from click.testing import CliRunner

    from moeprep.cli import main

    out = tmp_path_factory.mktemp("smoke") / "tiny-phimoe-GGUF"
    shutil.copytree(converted_phimoe, out)
    # quality over two chunks of 128 tokens: the tiny model's tokenizer makes the whole text ~27k tokens
    result = CliRunner().invoke(main, ["smoke", str(out), "--json", "--quality-ctx", "128", "--quality-chunks", "2"])
    return out, result


@pytest.fixture
def write_token(monkeypatch) -> str:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    return WRITE_TOKEN


@pytest.fixture(scope="session")
def converted_local(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The mixtral and dense llama checkpoints converted from local directories."""
    from moeprep.release.pipeline import prepare

    root = tmp_path_factory.mktemp("local")
    for kind in ("mixtral", "llama"):
        prepare(str(checkpoints[kind]), out=root / kind)
    return {kind: root / kind for kind in ("mixtral", "llama")}

