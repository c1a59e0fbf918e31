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
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

KINDS = ("phimoe", "mixtral", "llama")

# The smoke prompt's neighbourhood: what the test fixtures' tokenizer is trained on (the demo's own model is trained
# on the calibration text).

TEXT = """\
The quick brown fox jumps over the lazy dog while the morning sun rises over the quiet valley.
A mixture of experts routes every token to a few of many feed-forward networks, so a large model
runs with the arithmetic of a small one. Each layer has a router that scores the experts and keeps
the best two. The experts hold most of the weights, which is why moving them to system memory lets
a model that is far larger than the graphics card still run at a useful speed.
Quantization stores each weight in fewer bits. Eight bits keep almost everything, four bits keep
most of it, and two bits lose a noticeable part of the model's knowledge. Careful measurement tells
which files are worth publishing: the divergence of the next-token distribution from the full
precision reference, the agreement of the most likely token, and the speed on real hardware.
Rivers carry water from the mountains to the sea, and cities grow along their banks. Farmers plant
wheat in autumn and harvest it in summer; bakers turn the flour into bread before dawn. Children
learn to count, to read, and to ask why the sky is blue. Music, mathematics and language share a
structure of patterns that repeat and change. Ships cross the ocean guided by stars and by maps.
Numbers such as 1, 2, 3, 10, 42, 100 and 2026 appear in text as often as words like and, the, of.
"""


# Phi-3.5-MoE-instruct's chat template (its tokenizer_config.json), so the demo's GGUFs carry one as real ones do.
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
                 "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
                 "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
                 "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def make_tokenizer(folder: Path, vocab_size: int = 512, lines: list[str] | None = None) -> int:
    """Train a BPE sentencepiece model on `lines` (default: the built-in text) and write it with its config."""
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
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    return vocab_size


def model_config(kind: str, vocab: int) -> dict:
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


def random_tensors(config: dict, seed: int) -> dict:
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


def build(kind: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight `kind` checkpoint into `folder`, sharded in two like real releases."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config(kind, make_tokenizer(folder))
    readme = f"A tiny random-weight {config['architectures'][0]} made by moeprep for tests."
    return write(folder, kind, config, random_tensors(config, seed), readme)


def write(folder: Path, kind: str, config: dict, tensors: dict, readme: str) -> Path:
    """Write config, generation config, `tensors` in two safetensors shards with their index, and a README
    into `folder`, which already holds the tokenizer."""
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
