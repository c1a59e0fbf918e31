"""GGUFs written directly with gguf-py, for layouts the converter cannot produce offline.

qwen2moe, deepseek2 and gpt-oss converters need the real BPE tokenizers (their pre-tokenizer is
recognised by hash), so these files are built tensor by tensor with the names and metadata keys
the current converter writes (see NOTES.md, "GGUF expert layouts"). Widths are multiples of 256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

H, FF, FF_EXP, VOCAB = 256, 512, 256, 512


def _spm_vocab(writer, tokenizer_model: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write(path: Path, arch: str, kv: dict[str, int], tensors: dict[str, tuple[int, ...]],
          tokenizer_model: Path | None = None, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer_model:
        _spm_vocab(writer, tokenizer_model)
    for name, shape in tensors.items():
        if name.endswith("norm.weight"):
            data = np.ones(shape, dtype=np.float32)
        elif len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            data = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        else:
            data = (rng.standard_normal(shape) * 0.02).astype(np.float16)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _attention(b: int, bias: bool = False) -> dict:
    t = {f"blk.{b}.attn_norm.weight": (H,), f"blk.{b}.attn_q.weight": (H, H), f"blk.{b}.attn_k.weight": (H // 2, H),
         f"blk.{b}.attn_v.weight": (H // 2, H), f"blk.{b}.attn_output.weight": (H, H), f"blk.{b}.ffn_norm.weight": (H,)}
    if bias:
        t |= {f"blk.{b}.attn_q.bias": (H,), f"blk.{b}.attn_k.bias": (H // 2,), f"blk.{b}.attn_v.bias": (H // 2,)}
    return t


def _ends(t: dict) -> dict:
    return {"token_embd.weight": (VOCAB, H), **t, "output_norm.weight": (H,), "output.weight": (VOCAB, H)}


ATTN_KV = {"context_length": 4096, "embedding_length": H, "attention.head_count": 4, "attention.head_count_kv": 2}


def qwen2moe(path: Path, tokenizer_model: Path, blocks: int = 2, experts: int = 8) -> Path:
    """Qwen1.5/2-MoE layout: routed experts plus one shared expert with its own gate."""
    t = {}
    for b in range(blocks):
        t |= _attention(b, bias=True)
        t |= {f"blk.{b}.ffn_gate_inp.weight": (experts, H),
              f"blk.{b}.ffn_gate_exps.weight": (experts, FF_EXP, H), f"blk.{b}.ffn_up_exps.weight": (experts, FF_EXP, H),
              f"blk.{b}.ffn_down_exps.weight": (experts, H, FF_EXP),
              f"blk.{b}.ffn_gate_inp_shexp.weight": (H,),
              f"blk.{b}.ffn_gate_shexp.weight": (FF, H), f"blk.{b}.ffn_up_shexp.weight": (FF, H),
              f"blk.{b}.ffn_down_shexp.weight": (H, FF)}
    kv = {**ATTN_KV, "block_count": blocks, "feed_forward_length": FF, "expert_feed_forward_length": FF_EXP,
          "expert_shared_feed_forward_length": FF, "expert_count": experts, "expert_used_count": 2}
    return write(path, "qwen2moe", kv, _ends(t), tokenizer_model)


def deepseek2(path: Path, blocks: int = 3, experts: int = 8) -> Path:
    """DeepSeek-V2/V3 layout: a leading dense block, then routed + shared experts and exp_probs_b."""
    t = {}
    for b in range(blocks):
        t |= _attention(b)
        if b == 0:
            t |= {f"blk.{b}.ffn_gate.weight": (FF, H), f"blk.{b}.ffn_up.weight": (FF, H),
                  f"blk.{b}.ffn_down.weight": (H, FF)}
        else:
            t |= {f"blk.{b}.ffn_gate_inp.weight": (experts, H), f"blk.{b}.exp_probs_b.bias": (experts,),
                  f"blk.{b}.ffn_gate_exps.weight": (experts, FF_EXP, H),
                  f"blk.{b}.ffn_up_exps.weight": (experts, FF_EXP, H),
                  f"blk.{b}.ffn_down_exps.weight": (experts, H, FF_EXP),
                  f"blk.{b}.ffn_gate_shexp.weight": (2 * FF_EXP, H), f"blk.{b}.ffn_up_shexp.weight": (2 * FF_EXP, H),
                  f"blk.{b}.ffn_down_shexp.weight": (H, 2 * FF_EXP)}
    kv = {**ATTN_KV, "block_count": blocks, "feed_forward_length": FF, "expert_feed_forward_length": FF_EXP,
          "leading_dense_block_count": 1, "expert_shared_count": 2, "expert_count": experts, "expert_used_count": 2}
    return write(path, "deepseek2", kv, _ends(t))


def gpt_oss(path: Path, blocks: int = 2, experts: int = 4) -> Path:
    """gpt-oss layout: expert tensors carry biases, which --cpu-moe moves too."""
    t = {}
    for b in range(blocks):
        t |= _attention(b)
        t |= {f"blk.{b}.ffn_gate_inp.weight": (experts, H), f"blk.{b}.ffn_gate_inp.bias": (experts,)}
        for p, shape in (("gate", (experts, FF_EXP, H)), ("up", (experts, FF_EXP, H)), ("down", (experts, H, FF_EXP))):
            t[f"blk.{b}.ffn_{p}_exps.weight"] = shape
            t[f"blk.{b}.ffn_{p}_exps.bias"] = (experts, shape[1])
    kv = {**ATTN_KV, "block_count": blocks, "expert_feed_forward_length": FF_EXP, "expert_count": experts,
          "expert_used_count": 2}
    return write(path, "gpt-oss", kv, _ends(t))


def fused_gate_up(path: Path, blocks: int = 2, experts: int = 4) -> Path:
    """qwen3moe converted with --fuse-gate-up-exps: one ffn_gate_up_exps tensor per layer."""
    t = {}
    for b in range(blocks):
        t |= _attention(b)
        t |= {f"blk.{b}.ffn_gate_inp.weight": (experts, H),
              f"blk.{b}.ffn_gate_up_exps.weight": (experts, 2 * FF_EXP, H),
              f"blk.{b}.ffn_down_exps.weight": (experts, H, FF_EXP)}
    kv = {**ATTN_KV, "block_count": blocks, "expert_feed_forward_length": FF_EXP, "expert_count": experts,
          "expert_used_count": 2}
    return write(path, "qwen3moe", kv, _ends(t))


def legacy_mixtral(path: Path, blocks: int = 2, experts: int = 4) -> Path:
    """Old Mixtral files: one tensor per expert (blk.N.ffn_gate.E.weight), which llama.cpp no longer loads."""
    t = {}
    for b in range(blocks):
        t |= _attention(b)
        t[f"blk.{b}.ffn_gate_inp.weight"] = (experts, H)
        for e in range(experts):
            t |= {f"blk.{b}.ffn_gate.{e}.weight": (FF, H), f"blk.{b}.ffn_up.{e}.weight": (FF, H),
                  f"blk.{b}.ffn_down.{e}.weight": (H, FF)}
    kv = {**ATTN_KV, "block_count": blocks, "feed_forward_length": FF, "expert_count": experts, "expert_used_count": 2}
    return write(path, "llama", kv, _ends(t))


def sparse(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[int, ...]], vocab: int = VOCAB) -> Path:
    """A GGUF of `arch` whose tensor data is a hole: the metadata and tensor infos llama.cpp's no_alloc load reads,
    every weight F16 (1-D ones F32), and a file of the size the data would take. For memory figures only."""
    import gguf

    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [f"\u2581w{i}" for i in range(vocab - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    end = 0
    for name, shape in tensors.items():
        kind = T.F32 if len(shape) == 1 else T.F16
        block, size = gguf.GGML_QUANT_SIZES[kind]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=kind)
        end = w.ggml_pad(end, w.data_alignment) + nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(w.ggml_pad(f.seek(0, 2), w.data_alignment) + end)
    return path


def gpt_oss_sparse(path: Path, blocks: int = 4, experts: int = 4, window: int = 128) -> Path:
    """A gpt-oss GGUF llama.cpp loads (attention sinks, biases, post-attention norm), as a sparse stand-in: every
    second layer attends within a sliding window of `window` tokens, as gpt-oss's do."""
    n_embd, heads, kv_heads, head, ff_exp = 512, 8, 2, 64, 256
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, n_embd), "output_norm.weight": (n_embd,),
                                     "output.weight": (VOCAB, n_embd)}
    for b in range(blocks):
        p = f"blk.{b}."
        t |= {p + "attn_norm.weight": (n_embd,), p + "post_attention_norm.weight": (n_embd,),
              p + "attn_q.weight": (heads * head, n_embd), p + "attn_q.bias": (heads * head,),
              p + "attn_k.weight": (kv_heads * head, n_embd), p + "attn_k.bias": (kv_heads * head,),
              p + "attn_v.weight": (kv_heads * head, n_embd), p + "attn_v.bias": (kv_heads * head,),
              p + "attn_output.weight": (n_embd, heads * head), p + "attn_output.bias": (n_embd,),
              p + "attn_sinks.weight": (heads,),
              p + "ffn_gate_inp.weight": (experts, n_embd), p + "ffn_gate_inp.bias": (experts,)}
        for name, shape in (("gate", (experts, ff_exp, n_embd)), ("up", (experts, ff_exp, n_embd)),
                            ("down", (experts, n_embd, ff_exp))):
            t[p + f"ffn_{name}_exps.weight"] = shape
            t[p + f"ffn_{name}_exps.bias"] = (experts, shape[1])
    kv = {"context_length": 32768, "embedding_length": n_embd, "block_count": blocks, "attention.head_count": heads,
          "attention.head_count_kv": kv_heads, "attention.key_length": head, "attention.value_length": head,
          "rope.dimension_count": head, "attention.sliding_window": window, "expert_count": experts,
          "expert_used_count": 2, "expert_feed_forward_length": ff_exp, "feed_forward_length": ff_exp,
          "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 150000.0}
    return sparse(path, "gpt-oss", kv, t)


def kv_heavy(path: Path, blocks: int = 8, experts: int = 8, trained: int = 1 << 20) -> Path:
    """A llama-layout MoE whose KV cache outgrows its weights within its trained context (1M tokens, 8 KV heads of
    128): what a long-context model is on a small GPU. Sparse: memory figures only."""
    n, heads, kv_heads, ff = 2048, 16, 8, 1024
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (VOCAB, n), "output_norm.weight": (n,),
                                     "output.weight": (VOCAB, n)}
    for b in range(blocks):
        p = f"blk.{b}."
        t |= {p + "attn_norm.weight": (n,), p + "attn_q.weight": (n, n), p + "attn_k.weight": (kv_heads * 128, n),
              p + "attn_v.weight": (kv_heads * 128, n), p + "attn_output.weight": (n, n), p + "ffn_norm.weight": (n,),
              p + "ffn_gate_inp.weight": (experts, n), p + "ffn_gate_exps.weight": (experts, ff, n),
              p + "ffn_up_exps.weight": (experts, ff, n), p + "ffn_down_exps.weight": (experts, n, ff)}
    kv = {"block_count": blocks, "context_length": trained, "embedding_length": n, "feed_forward_length": ff,
          "attention.head_count": heads, "attention.head_count_kv": kv_heads, "expert_count": experts,
          "expert_used_count": 2, "attention.layer_norm_rms_epsilon": 1e-5, "rope.dimension_count": 128}
    return sparse(path, "llama", kv, t)
