"""What smoke and the quality stage measure with: the settings as this machine resolves them, llama-server's
context for them, and the F16 reference every file's quality is scored against."""

from __future__ import annotations

from contextlib import closing
from dataclasses import replace
from pathlib import Path

from moeprep import hardware
from moeprep.errors import MoeprepError
from moeprep.llama.context import ContextParams, session, tokenize
from moeprep.llama.evaluate import chunk_logits, chunking, eval_context, n_chunks, n_vocab
from moeprep.quality import scoring
from moeprep.quality.text import EvalText, eval_text
from moeprep.records.results import Quality, SmokeSettings


def context_params(settings: SmokeSettings, n_ctx: int | None = None) -> ContextParams:
    """llama-server's context, with the settings' size, batches, threads and flash attention."""
    return ContextParams(n_ctx=n_ctx or settings.ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                         threads=settings.threads or hardware.physical_cores(), flash_attn=settings.flash_attn)


def reference_for(path: Path, sha256: str | None, settings: SmokeSettings,
                  text: EvalText | None = None) -> scoring.Reference:
    """The F16 over the evaluation text (kept as llama-perplexity --kl-divergence-base keeps it) and its greedy
    output on the prompt."""
    text = text or eval_text()
    chunks = chunking(settings.quality_ctx, settings.n_batch, settings.n_ubatch)
    with _eval_context(path, settings, chunks) as (ctx, vocab):
        tokens = tokenize(vocab, text.data)
        n_chunk = n_chunks(len(tokens), chunks.ctx, settings.quality_chunks, text.name)
        with closing(chunk_logits(ctx, vocab, tokens, chunks, n_chunk)) as logits:
            ref = scoring.build_reference(path.name, sha256, text, tokens, chunks, n_chunk, n_vocab(vocab), logits)
    ref.greedy_tokens = greedy(path, settings)
    return ref


def greedy(path: Path, settings: SmokeSettings) -> list[int]:
    """Greedy output on the smoke prompt, every layer offloaded: what the collapse check compares."""
    with session(path, [], context_params(settings), []) as s:
        return s.generate(s.tokenize(settings.prompt.encode()), settings.new_tokens).tokens


def quality_of(path: Path, reference: scoring.Reference, settings: SmokeSettings) -> Quality:
    """`path` scored against the F16 over the reference's chunks, as llama-perplexity --kl-divergence does."""
    with _eval_context(path, settings, reference.chunking) as (ctx, vocab):
        if (size := n_vocab(vocab)) != reference.n_vocab:
            raise MoeprepError(f"{path.name} has a vocabulary of {size} tokens, the reference {reference.path} "
                               f"{reference.n_vocab}", "compare files made from the same model")
        with closing(chunk_logits(ctx, vocab, reference.tokens, reference.chunking, reference.chunks)) as logits:
            return scoring.compare(reference, logits)


def resolved(settings: SmokeSettings, quality_text: Path | None = None) -> tuple[SmokeSettings, EvalText]:
    """The settings as recorded (threads resolved; the evaluation text's name and sha256) and the text itself."""
    text = eval_text(quality_text)
    return replace(settings, threads=settings.threads or hardware.physical_cores(), quality_text=text.name,
                   quality_text_sha256=text.sha256), text


def _eval_context(path: Path, settings: SmokeSettings, chunks):
    return eval_context(path, chunks, settings.threads or hardware.physical_cores(), settings.flash_attn)
