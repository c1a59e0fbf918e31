"""The recorded H200 runs, as the tests use them: llama.cpp's own CUDA figures, and the evidence model's GGUFs
rebuilt as sparse stand-ins (llama.cpp's memory figures depend only on a GGUF's header).

- 2026-11-26 (shared/gpu/evidence-2026-11-26-h200): a CUDA build without flash-attention kernels; llama-fit-params
  for F16 and Q4_K_M of an 8-block, 16-expert Phi-MoE (vocabulary 384), kept inline below; the GGUFs are written
  tensor by tensor (`evidence_gguf`).
- 2026-12-04 (shared/gpu/evidence-2026-12-04-h200-fa, copied into tests/data/h200-fa): a full CUDA build, flash
  attention included; llama-fit-params for every flash-attention setting (fit-fa.txt), the six raw load logs of
  the Q4_K_M at ctx 32768, and the two files' real headers (xz-compressed), from which `ph32k` rebuilds them.
"""

from __future__ import annotations

import lzma
import re
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
FA = DATA / "h200-fa"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "gpu" / "evidence-2026-11-26-h200"
MIB = 2**20

# run2/fit-matrix.txt of the evidence: llama-fit-params on the H200, MiB per device (model, context, compute),
# flash attention auto, which that build (GGML_CUDA_FA=OFF) resolves to off. Kept here so the check runs
# wherever the suite does; test_plan_fit_matrix_copy_matches_shared compares it with shared/ where present.
FIT_MATRIX = """\
## phimoe-gpu-F16 c=512 ub=512 gpu
CUDA0 2684 6 37 
Host 1 0 7 
## phimoe-gpu-F16 c=512 ub=512 cpu-moe
CUDA0 92 6 136 
Host 2593 0 7 
## phimoe-gpu-F16 c=512 ub=2048 gpu
CUDA0 2684 6 37 
Host 1 0 7 
## phimoe-gpu-F16 c=512 ub=2048 cpu-moe
CUDA0 92 6 136 
Host 2593 0 7 
## phimoe-gpu-F16 c=4096 ub=512 gpu
CUDA0 2684 48 116 
Host 1 0 14 
## phimoe-gpu-F16 c=4096 ub=512 cpu-moe
CUDA0 92 48 143 
Host 2593 0 14 
## phimoe-gpu-F16 c=4096 ub=2048 gpu
CUDA0 2684 48 464 
Host 1 0 56 
## phimoe-gpu-F16 c=4096 ub=2048 cpu-moe
CUDA0 92 48 464 
Host 2593 0 56 
## phimoe-gpu-F16 c=32768 ub=512 gpu
CUDA0 2684 384 868 
Host 1 0 70 
## phimoe-gpu-F16 c=32768 ub=512 cpu-moe
CUDA0 92 384 868 
Host 2593 0 70 
## phimoe-gpu-F16 c=32768 ub=2048 gpu
CUDA0 2684 384 3400 
Host 1 0 280 
## phimoe-gpu-F16 c=32768 ub=2048 cpu-moe
CUDA0 92 384 3412 
Host 2593 0 280 
## phimoe-gpu-Q4_K_M c=512 ub=512 gpu
CUDA0 812 6 37 
Host 0 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=512 cpu-moe
CUDA0 27 6 69 
Host 785 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=2048 gpu
CUDA0 812 6 37 
Host 0 0 7 
## phimoe-gpu-Q4_K_M c=512 ub=2048 cpu-moe
CUDA0 27 6 69 
Host 785 0 7 
## phimoe-gpu-Q4_K_M c=4096 ub=512 gpu
CUDA0 812 48 116 
Host 0 0 14 
## phimoe-gpu-Q4_K_M c=4096 ub=512 cpu-moe
CUDA0 27 48 119 
Host 785 0 14 
## phimoe-gpu-Q4_K_M c=4096 ub=2048 gpu
CUDA0 812 48 464 
Host 0 0 56 
## phimoe-gpu-Q4_K_M c=4096 ub=2048 cpu-moe
CUDA0 27 48 464 
Host 785 0 56 
## phimoe-gpu-Q4_K_M c=32768 ub=512 gpu
CUDA0 812 384 868 
Host 0 0 70 
## phimoe-gpu-Q4_K_M c=32768 ub=512 cpu-moe
CUDA0 27 384 868 
Host 785 0 70 
## phimoe-gpu-Q4_K_M c=32768 ub=2048 gpu
CUDA0 812 384 3400 
Host 0 0 280 
## phimoe-gpu-Q4_K_M c=32768 ub=2048 cpu-moe
CUDA0 27 384 3412 
Host 785 0 280 
"""
ROWS = [(q, int(c), int(ub), p, int(m), int(kv), int(comp)) for q, c, ub, p, m, kv, comp in
        re.findall(r"## phimoe-gpu-(\S+) c=(\d+) ub=(\d+) (\S+)\nCUDA0 (\d+) (\d+) (\d+)", FIT_MATRIX)]

# run1/manifest.json of the evidence: the GPU smoke's CUDA0 buffers (MiB; model, KV, compute) from real
# loads through llama-cpp-python at ctx 512, n_ubatch 512, flash attention disabled.
SMOKE_H200 = {
    "F16": {"gpu": (2684.19, 6.0, 38.51), "cpu-moe": (92.19, 6.0, 137.6), "n-cpu-moe=4": (1388.19, 6.0, 134.61)},
    "Q4_K_M": {"gpu": (812.11, 6.0, 38.51), "cpu-moe": (27.42, 6.0, 70.9), "n-cpu-moe=4": (419.77, 6.0, 67.91)},
}
# The converted files' tensor bytes (run1/plan-phimoe-gpu-*.json, weights_total).
WEIGHTS_TOTAL = {"F16": 2815760384, "Q4_K_M": 851890688}

WIDTH, FF, BLOCKS, HEADS, KV_HEADS, EXPERTS, VOCAB, HEAD_DIM = 1536, 2304, 8, 12, 3, 16, 384, 128
# llama.cpp's Q4_K_M gives attn_v and ffn_down more bits (q6_K) in the first and last eighth of the blocks and
# every third between; for 8 blocks that is 0, 3, 6, 7 (run1's Q4_K_M log: 49 q4_K, 9 q6_K tensors).
Q6_K_BLOCKS = {0, 3, 6, 7}


def evidence_gguf(path: Path, quant: str, drop: tuple[str, ...] = ()) -> Path:
    """The evidence model's GGUF as a sparse file: its metadata, tensor names, shapes and types; no data."""
    import gguf

    T = gguf.GGMLQuantizationType

    def kind(name: str, shape: tuple[int, ...]):
        if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            return T.F32
        if quant == "F16":
            return T.F16
        block = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name == "output.weight" or (block in Q6_K_BLOCKS and (".attn_v." in name or ".ffn_down_exps." in name)):
            return T.Q6_K
        return T.Q4_K

    kv = KV_HEADS * HEAD_DIM
    tensors = {"token_embd.weight": (VOCAB, WIDTH), "rope_factors_long.weight": (HEAD_DIM // 2,),
               "rope_factors_short.weight": (HEAD_DIM // 2,)}
    for b in range(BLOCKS):
        p = f"blk.{b}."
        tensors |= {p + "attn_norm.weight": (WIDTH,), p + "attn_norm.bias": (WIDTH,),
                    p + "attn_q.weight": (WIDTH, WIDTH), p + "attn_q.bias": (WIDTH,),
                    p + "attn_k.weight": (kv, WIDTH), p + "attn_k.bias": (kv,),
                    p + "attn_v.weight": (kv, WIDTH), p + "attn_v.bias": (kv,),
                    p + "attn_output.weight": (WIDTH, WIDTH), p + "attn_output.bias": (WIDTH,),
                    p + "ffn_norm.weight": (WIDTH,), p + "ffn_norm.bias": (WIDTH,),
                    p + "ffn_gate_inp.weight": (EXPERTS, WIDTH),
                    p + "ffn_gate_exps.weight": (EXPERTS, FF, WIDTH), p + "ffn_up_exps.weight": (EXPERTS, FF, WIDTH),
                    p + "ffn_down_exps.weight": (EXPERTS, WIDTH, FF)}
    tensors |= {"output_norm.weight": (WIDTH,), "output_norm.bias": (WIDTH,), "output.weight": (VOCAB, WIDTH),
                "output.bias": (VOCAB,)}

    w = gguf.GGUFWriter(str(path), "phimoe")
    w.add_name("phimoe-gpu")
    w.add_context_length(131072)
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(FF)
    w.add_block_count(BLOCKS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_uint32("phimoe.rope.scaling.original_context_length", 4096)
    w.add_float32("phimoe.rope.scaling.attn_factor", 1.190238118171692)
    w.add_uint32("phimoe.attention.sliding_window", 0)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(2)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_quantization_version(2)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [f"\u2581w{i}" for i in range(VOCAB - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    end = 0
    for name, shape in tensors.items():
        if name in drop:
            continue
        t = kind(name, shape)
        block, size = gguf.GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=t)
        end = w.ggml_pad(end, w.data_alignment) + nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(w.ggml_pad(f.seek(0, 2), w.data_alignment) + end)  # a hole where the tensor data would be
    return path




# fit-fa.txt: llama-fit-params on the H200's full CUDA build, CUDA0 model, context (KV) and compute MiB.
FIT_FA = [(q, int(c), int(ub), p, fa, int(m), int(kv), int(comp)) for q, c, ub, p, fa, m, kv, comp in re.findall(
    r"## ph32k-(\S+) c=(\d+) ub=(\d+) (\S+) fa=(\S+)\nCUDA0 (\d+) (\d+) (\d+)", (FA / "fit-fa.txt").read_text())]


def ph32k(folder: Path) -> dict[str, Path]:
    """The 2026-12-04 evidence model's F16 and Q4_K_M: each real header, then a hole up to the file's size."""
    out = {}
    for quant in ("F16", "Q4_K_M"):
        path = folder / f"ph32k-{quant}.gguf"
        path.write_bytes(lzma.decompress((FA / f"ph32k-{quant}.gguf.hdr.xz").read_bytes()))
        with open(path, "r+b") as f:
            f.truncate(int((FA / f"ph32k-{quant}.gguf.size").read_text()))
        out[quant] = path
    return out


def load_log(name: str) -> str:
    """One of the six raw llama.cpp load logs of the Q4_K_M at ctx 32768 (log-ph32k-Q4_K_M-<placement>-fa-<fa>)."""
    return lzma.decompress((FA / f"log-ph32k-Q4_K_M-{name}.txt.xz").read_bytes()).decode()
