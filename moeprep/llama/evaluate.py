"""The logits llama-perplexity scores: the evaluation text decoded in chunks, as perplexity() and kl_divergence()
in tools/perplexity/perplexity.cpp decode it, through libllama's C API."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as ll
import numpy as np

from moeprep.errors import MoeprepError
from moeprep.llama.context import ContextParams, loaded_model, new_context


@dataclass(frozen=True)
class Chunking:
    """How llama-perplexity cuts and batches the text for `-c ctx -b n_batch -ub n_ubatch`.

    It decodes n_seq = max(1, n_batch / ctx) chunks at once, one sequence each, in a context of n_seq * ctx,
    with n_batch capped at that context (so n_batch is a multiple of ctx, or less than it: then each chunk
    takes several decodes). llama.cpp caps n_ubatch at n_batch.
    """

    ctx: int
    n_seq: int
    n_batch: int
    n_ubatch: int

    @property
    def first(self) -> int:
        return self.ctx // 2  # the first position scored

    @property
    def scored(self) -> int:
        return self.ctx - 1 - self.first  # positions scored per chunk

    @property
    def n_ctx(self) -> int:
        return self.n_seq * self.ctx


def chunking(ctx: int, n_batch: int, n_ubatch: int) -> Chunking:
    n_seq = max(1, n_batch // ctx)
    batch = min(n_batch, n_seq * ctx)
    return Chunking(ctx, n_seq, batch, min(n_ubatch, batch))


def n_chunks(n_tokens: int, ctx: int, wanted: int, text: str) -> int:
    """Chunks to score: all whole chunks (wanted = 0) or the first `wanted`; llama-perplexity needs two at least."""
    if n_tokens < 2 * ctx:
        raise MoeprepError(f"the evaluation text {text} is {n_tokens} tokens for this model; chunks of {ctx} tokens "
                           f"need at least {2 * ctx}, as in llama-perplexity",
                           "lower --quality-ctx, or give a longer --quality-text")
    most = n_tokens // ctx
    return most if wanted <= 0 else min(wanted, most)


def n_vocab(vocab) -> int:
    return ll.llama_vocab_n_tokens(vocab)


@contextmanager
def eval_context(path: Path, chunks: Chunking, threads: int, flash_attn: str) -> Iterator[tuple[object, object]]:
    """(context, vocab) for `path` as llama-perplexity creates them for `chunks`: every layer offloaded, one
    sequence per chunk decoded together, n_ctx = n_seq * ctx, its n_batch and n_ubatch, the smoke's threads and
    flash attention, a sliding-window cache no larger than the window (common's default)."""
    params = ContextParams(n_ctx=chunks.n_ctx, n_batch=chunks.n_batch, n_ubatch=chunks.n_ubatch, n_seq_max=chunks.n_seq,
                           kv_unified=False, threads=threads, flash_attn=flash_attn)
    with loaded_model(path, what="load to measure the quality of") as model, \
            new_context(model, params, what=f"make (for {path.name}'s quality)") as ctx:
        yield ctx, ll.llama_model_get_vocab(model)


def chunk_logits(ctx, vocab, tokens: list[int], chunks: Chunking, n_chunk: int) -> Generator[np.ndarray, None, None]:
    """The logits llama-perplexity scores, one [scored, vocab] float32 array per chunk, in order. An array
    may be a view of llama.cpp's own buffer: it is valid until the next one is asked for.

    As perplexity() and kl_divergence() do: n_seq chunks per step from a cleared KV cache, each its own
    sequence; the first token of each chunk replaced by BOS where the vocabulary adds one; outputs asked for
    at positions from ctx/2 on; a chunk longer than n_batch takes several decodes.
    """
    c = chunks
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    bos = ll.llama_vocab_bos(vocab) if ll.llama_vocab_get_add_bos(vocab) else None
    steps = -(-c.ctx // c.n_batch)
    memory = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(c.n_batch, 0, c.n_seq)
    try:
        for i in range(0, n_chunk, c.n_seq):
            group = min(c.n_seq, n_chunk - i)
            ll.llama_memory_clear(memory, True)
            outputs: list[list] = [[] for _ in range(group)]
            for j in range(steps):
                begin = j * c.n_batch
                size = min(c.ctx - begin, c.n_batch)
                n = 0
                for seq in range(group):
                    start = (i + seq) * c.ctx + begin
                    for k in range(size):
                        batch.token[n] = bos if bos is not None and j == 0 and k == 0 else tokens[start + k]
                        batch.pos[n] = begin + k
                        batch.n_seq_id[n] = 1
                        batch.seq_id[n][0] = seq
                        batch.logits[n] = begin + k >= c.first
                        n += 1
                batch.n_tokens = n
                if (rc := ll.llama_decode(ctx, batch)) != 0:
                    raise MoeprepError(f"llama.cpp failed to decode chunk {i + 1} of the evaluation text (code {rc})",
                                       "lower --quality-ctx or --batch")
                wanted = max(0, begin + size - max(begin, c.first))  # outputs per sequence in this decode
                if wanted:
                    rows = np.ctypeslib.as_array(ll.llama_get_logits(ctx), shape=(group * wanted, n_vocab))
                    for seq in range(group):  # one decode per chunk: no copy, the next decode comes later
                        part = rows[seq * wanted:(seq + 1) * wanted]
                        outputs[seq].append(part if steps == 1 else part.copy())
            for seq in range(group):
                yield (outputs[seq][0] if steps == 1 else np.concatenate(outputs[seq]))[: c.scored]
    finally:
        ll.llama_batch_free(batch)
