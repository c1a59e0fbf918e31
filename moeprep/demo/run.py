"""The demo: the whole job on a tiny synthetic checkpoint that mirrors a real MoE config.

Each config.json copies the real model's (the exact `architectures` string, rope scaling, biases) at
small width. Widths are multiples of 256 so the K-quants really apply. The tokenizer is a
sentencepiece model trained here: nothing is downloaded. `build` writes random weights, fast: those
are the tests' fixtures. The demo itself runs on the same model trained briefly on the calibration
text (moeprep/train.py), so its generated text and quality figures mean something.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moeprep.quality.scoring import TEXT

if TYPE_CHECKING:
    from moeprep.predict.plan import Plan
    from moeprep.records.manifest import Manifest
    from moeprep.records.outcome import Outcome

KINDS = ("phimoe", "mixtral", "llama")


def _tokenizer(folder: Path, vocab_size: int = 512, lines: list[str] | None = None) -> int:
    """Train a BPE sentencepiece model on `lines` (default: the built-in text) and write it with its config."""
    import sentencepiece as spm

    model = io.BytesIO()
    if lines is None:
        lines = [line for line in TEXT.splitlines() if line.strip()] * 4
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096, "tokenizer_class": "LlamaTokenizer",
    }, indent=2))
    return vocab_size


def _config(kind: str, vocab: int) -> dict:
    common = {
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 256,
        "initializer_range": 0.02, "intermediate_size": 512, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": vocab,
    }
    if kind == "phimoe":  # microsoft/Phi-3.5-MoE-instruct
        head_dim = 256 // 4
        factors = [1.0 + i / 16 for i in range(head_dim // 2)]
        return {**common, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
                "attention_bias": True, "lm_head_bias": True, "attention_dropout": 0.0,
                "hidden_dropout": 0.0, "input_jitter_noise": 0.01, "max_position_embeddings": 8192,
                "original_max_position_embeddings": 2048, "num_experts_per_tok": 2,
                "num_local_experts": 16, "output_router_logits": False, "rope_theta": 10000.0,
                "rope_scaling": {"type": "longrope", "long_factor": factors, "short_factor": factors[::-1],
                                 "long_mscale": 1.243163121016122, "short_mscale": 1.243163121016122,
                                 "original_max_position_embeddings": 2048},
                "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 8192}
    if kind == "mixtral":  # mistralai/Mixtral-8x7B-Instruct-v0.1
        return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "attention_dropout": 0.0, "max_position_embeddings": 4096, "num_experts_per_tok": 2,
                "num_local_experts": 8, "output_router_logits": False, "rope_theta": 1000000.0,
                "router_aux_loss_coef": 0.02, "sliding_window": None}
    if kind == "llama":  # a dense Llama-style model
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
                "mlp_bias": False}
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")


def _tensors(config: dict, seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hd
    phi = config["model_type"] == "phimoe"
    experts = config.get("num_local_experts", 0)

    def w(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    def norm(name: str, out: dict):
        out[f"{name}.weight"] = (1 + torch.randn(h, generator=gen) * 0.02).to(torch.bfloat16)
        if phi:  # Phi-MoE uses LayerNorm with a bias
            out[f"{name}.bias"] = w(h)

    t: dict = {"model.embed_tokens.weight": w(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm", t)
        norm(f"{p}.post_attention_layernorm", t)
        for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            t[f"{p}.self_attn.{proj}.weight"] = w(rows, h)
            if config.get("attention_bias"):
                t[f"{p}.self_attn.{proj}.bias"] = w(rows)
        if experts:
            t[f"{p}.block_sparse_moe.gate.weight"] = w(experts, h, scale=0.5)
            for e in range(experts):
                t[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = w(f, h)
                t[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = w(h, f)
                t[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = w(f, h)
        else:
            t[f"{p}.mlp.gate_proj.weight"] = w(f, h)
            t[f"{p}.mlp.up_proj.weight"] = w(f, h)
            t[f"{p}.mlp.down_proj.weight"] = w(h, f)
    norm("model.norm", t)
    t["lm_head.weight"] = w(v, h)
    if config.get("lm_head_bias"):
        t["lm_head.bias"] = w(v)
    return t


@dataclass
class DemoRun:
    out: Path
    convert: Outcome
    smoke: Outcome
    plan: Plan
    card: Outcome
    manifest: Manifest  # as the job left it, smoke results included


def run(kind: str, out: Path, *, runs: int = 3, status=lambda line: None) -> DemoRun:
    """Train the checkpoint (or take it from the cache), then convert, quantize, probe, smoke, plan and write
    the card (a local draft)."""
    from moeprep.errors import MoeprepError
    from moeprep.lock import locked
    from moeprep.predict.plan import plan_file
    from moeprep.records import manifest as mf
    from moeprep.records.results import SmokeSettings
    from moeprep.stages import card as cardstage
    from moeprep.stages import smoke
    from moeprep.stages.pipeline import artifact_name, prepare

    folder = Path(out) / f"tiny-{kind}-GGUF"
    with locked(folder, "demo"):
        source = checkpoint(kind, out, status)
        converted = prepare(str(source), out=folder, status=status)
        # 8 chunks of 512 (2,040 scored tokens) of the evaluation text: the whole text would add minutes
        smoked = smoke.run(folder, SmokeSettings(runs=runs, quality_ctx=512, quality_chunks=8), only_stale=True,
                           status=status)
        if smoked.result and (failed := smoked.result.failed()):
            name, reasons = next(iter(failed.items()))
            raise MoeprepError(f"the demo's smoke failed for {name}: {reasons[0]}", "report this as a moeprep bug")
        plan = plan_file(folder / artifact_name(source.name, "Q4_K_M"))
        written = cardstage.write(folder, cardstage.CardOptions(draft=True), status=status)
    return DemoRun(folder, converted, smoked, plan, written, mf.load(folder))


def checkpoint(kind: str, out: Path, status=lambda line: None) -> Path:
    """The demo's trained checkpoint, copied from the cache to `out/tiny-<kind>` unless that copy is current."""
    from moeprep.demo.train import replace_folder, trained

    model = trained(kind, status=status)
    source = Path(out) / f"tiny-{kind}"
    if model.key != _trained_key(source):
        status(f"copying the trained tiny {kind} from {model.path} to {source}")
        replace_folder(model.path, source)
    return source


def _trained_key(folder: Path) -> str | None:
    from moeprep.demo.train import RECORD

    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight `kind` checkpoint into `folder`, sharded in two like real releases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(kind, _tokenizer(folder))
    readme = f"A tiny random-weight {config['architectures'][0]} made by moeprep for tests."
    return write(folder, kind, config, _tensors(config, seed), readme)


def write(folder: Path, kind: str, config: dict, tensors: dict, readme: str) -> Path:
    """Write config, generation config, `tensors` in two safetensors shards with their index, and a README
    into `folder`, which already holds the tokenizer."""
    from safetensors.torch import save_file

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    names = list(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(x.numel() * x.element_size() for x in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "README.md").write_text(
        f"---\nlicense: mit\npipeline_tag: text-generation\nlanguage:\n- en\n---\n\n"
        f"# tiny-{kind}\n\n{readme}\n")
    return folder
