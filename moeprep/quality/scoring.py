"""Quality: a quant's next-token distributions against the F16's, scored as llama-perplexity scores them;
and output that collapses.

The evaluation text is tokenized by the model (BOS added as llama-perplexity adds it) and cut into chunks
of `ctx` tokens. Each chunk is decoded from an empty KV cache with its first token replaced by BOS, and
only its second half is scored: the logits at positions ctx/2 .. ctx-2 against the token that follows
each. The F16's log-probabilities are kept as llama-perplexity keeps them in its --kl-divergence-base
file (16 bits per vocabulary entry over the 16 nats below the top), and every file is scored against them
with llama-perplexity's sums: perplexity, KL divergence with its standard error and percentiles, "same
top p", RMS Δp. See tools/perplexity/perplexity.cpp: perplexity() and kl_divergence().
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import numpy as np

from moeprep.errors import MoeprepError
from moeprep.llama.evaluate import Chunking
from moeprep.quality.text import EvalText
from moeprep.records.results import GreedyAgreement, Quality

QUALITY_CTX = 512  # tokens per chunk: llama-perplexity's default -c
KLD_FLOOR = -16.0  # llama-perplexity keeps log-probabilities down to 16 nats below the top token's


def _log_sum_exp(logits):
    """max and log(sum(exp(x - max))) per row, as llama-perplexity computes them: float exps, a double sum."""
    top = logits.max(axis=1)
    total = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    return top, np.log(total).astype(np.float32)


def base_log_probs(logits):
    """The F16's log-probabilities at 16 bits, as llama-perplexity writes them to its --kl-divergence-base file:
    per row a scale and a floor (the top log-probability minus 16 nats at most), and each entry rounded to
    one of 65536 steps between them. Returns (scale, floor, steps, exact negative log-likelihood helper)."""
    logits = np.asarray(logits, dtype=np.float32)
    top, lse = _log_sum_exp(logits)
    low = np.maximum(logits.min(axis=1), top - np.float32(16))
    floor = (low - top - lse).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    steps = np.where(logits > low[:, None], np.rint(inv[:, None] * (logits - low[:, None])), 0)
    return scale, floor, steps.astype(np.uint16), top + lse


@dataclass
class _Sums:
    """Per-position values over every scored chunk, from which the figures are computed."""

    nll: list = field(default_factory=list)  # -log p(next token), the file scored
    nll_base: list = field(default_factory=list)  # the same from the F16's stored log-probabilities
    kld: list = field(default_factory=list)
    p_diff: list = field(default_factory=list)  # p(next token) minus the F16's
    same_top: list = field(default_factory=list)
    finite: bool = True


BLOCK = 32  # positions scored at once: a few [BLOCK, vocab] temporaries, even for a 200k vocabulary


def score(logits, next_tokens, scale, floor, steps, sums: _Sums) -> None:
    """One chunk's positions against the F16's stored log-probabilities: llama-perplexity's log_softmax() for
    --kl-divergence, vectorised. KL terms are summed where the F16's log-probability is above -16."""
    logits = np.asarray(logits, dtype=np.float32)
    if not bool(np.isfinite(logits).all()):
        sums.finite = False
        return
    for i in range(0, len(logits), BLOCK):
        block = slice(i, i + BLOCK)
        _score(logits[block], np.asarray(next_tokens)[block], scale[block], floor[block], steps[block], sums)


def _score(logits, next_tokens, scale, floor, steps, sums: _Sums) -> None:

    rows = np.arange(len(logits))
    top, lse = _log_sum_exp(logits)
    norm = top + lse
    nll = norm - logits[rows, next_tokens]
    base = scale[:, None] * steps.astype(np.float32) + floor[:, None]
    nll_base = -base[rows, next_tokens]
    terms = np.where(base > np.float32(KLD_FLOOR), np.exp(base) * (base - logits + norm[:, None]), np.float32(0))
    sums.kld.append(terms.sum(axis=1, dtype=np.float64))
    sums.nll.append(nll.astype(np.float64))
    sums.nll_base.append(nll_base.astype(np.float64))
    sums.p_diff.append(np.exp(-nll) - np.exp(-nll_base))
    sums.same_top.append(logits.argmax(axis=1) == base.argmax(axis=1))


def _mean_and_uncertainty(values) -> tuple[float, float]:
    """llama-perplexity's mean_and_uncertainty: the mean and its standard error (0 for 10 values or fewer)."""
    n = len(values)
    mean = float(np.sum(values) / n)
    var = float(np.sum(np.square(values)) / n) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _exp(x: float) -> float | None:
    """exp(x), or None where it overflows a double (a file that gives the text's tokens no probability at all)."""
    return math.exp(x) if x < 700 else None


def summarize(sums: _Sums) -> dict:
    """The figures llama-perplexity prints at the end of a --kl-divergence run."""
    if not sums.finite:
        return {"finite": False}
    nll, kld = np.concatenate(sums.nll), np.concatenate(sums.kld)
    p_diff, same = np.concatenate(sums.p_diff).astype(np.float64), np.concatenate(sums.same_top)
    n = len(kld)
    log_ppl, log_ppl_se = _mean_and_uncertainty(nll)
    kld_mean, kld_se = _mean_and_uncertainty(kld)
    mse, mse_se = _mean_and_uncertainty(np.square(p_diff))
    rms = math.sqrt(mse)
    top = float(same.sum()) / n
    values = np.sort(kld.astype(np.float32)).astype(np.float64)  # llama-perplexity keeps them as floats
    p99, p999 = np.quantile(values, [0.99, 0.999])
    ppl = _exp(log_ppl)
    return {
        "finite": True,
        "ppl": ppl,
        "ppl_se": ppl * log_ppl_se if ppl is not None else None,
        "kld_mean": kld_mean,
        "kld_se": kld_se,
        "kld_median": float(np.median(values)),
        "kld_p99": float(p99),
        "kld_p999": float(p999),
        "kld_max": float(values[-1]),
        "top1_agreement": top,
        "top1_se": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        "rms_dp": rms,
        "rms_dp_se": 0.5 / rms * mse_se if rms > 0 else 0.0,
        "positions": n,
    }


@dataclass
class Reference:
    """The F16 over the evaluation text, as llama-perplexity --kl-divergence-base keeps it, and its greedy output:
    what every file is compared with."""

    path: str
    sha256: str | None
    text: EvalText
    tokens: list[int]  # the whole text, as the F16's tokenizer gives it
    chunking: Chunking
    chunks: int
    n_vocab: int
    scale: np.ndarray  # float32 [positions]
    floor: np.ndarray  # float32 [positions]
    steps: np.ndarray  # uint16 [positions, vocab], memory-mapped from a temporary file
    ppl: float | None  # the F16's perplexity from its own logits: llama-perplexity's "Final estimate: PPL"
    ppl_se: float | None
    own: Quality | None = None  # the F16 scored against its stored log-probabilities, from the same logits
    greedy_tokens: list[int] = field(default_factory=list)

    def rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunking.scored, (chunk + 1) * self.chunking.scored)

    def next_tokens(self, chunk: int) -> list[int]:
        start = chunk * self.chunking.ctx
        return self.tokens[start + self.chunking.first + 1: start + self.chunking.ctx]

    def quality(self, sums: _Sums) -> Quality:
        c = self.chunking
        return Quality(reference=self.path, reference_sha256=self.sha256, text_sha256=self.text.sha256,
                       text=self.text.name, text_tokens=len(self.tokens), ctx=c.ctx, chunks=self.chunks,
                       n_seq=c.n_seq, n_batch=c.n_batch, n_ubatch=c.n_ubatch, ppl_reference=self.ppl,
                       ppl_reference_se=self.ppl_se, **summarize(sums))


def build_reference(path: str, sha256: str | None, text: EvalText, tokens: list[int], chunks: Chunking,
                    n_chunk: int, n_vocab: int, chunk_logits) -> Reference:
    """Keep the F16's log-probabilities from `chunk_logits` (one [scored, vocab] array per chunk, in order)
    as llama-perplexity --kl-divergence-base does, with its perplexity and its own scores."""
    positions = n_chunk * chunks.scored
    store = tempfile.TemporaryFile(prefix="moeprep-kld-base-")  # as large as llama-perplexity's base file
    steps = np.memmap(store, dtype=np.uint16, mode="w+", shape=(positions, n_vocab))
    scale = np.zeros(positions, dtype=np.float32)
    floor = np.zeros(positions, dtype=np.float32)
    exact: list = []
    own = _Sums()
    for i, logits in enumerate(chunk_logits):
        rows = slice(i * chunks.scored, (i + 1) * chunks.scored)
        start = i * chunks.ctx
        nxt = np.asarray(tokens[start + chunks.first + 1: start + chunks.ctx])
        logits = np.asarray(logits, dtype=np.float32)
        if not bool(np.isfinite(logits).all()):
            raise MoeprepError(f"the reference {path} gives NaN or inf logits in chunk {i + 1} of {text.name}, so no "
                               "file can be compared with it", "check the F16 with `moeprep smoke FILE` alone")
        for j in range(0, len(logits), BLOCK):
            part = slice(rows.start + j, min(rows.start + j + BLOCK, rows.stop))
            block = logits[j:j + BLOCK]
            scale[part], floor[part], steps[part], norm = base_log_probs(block)
            exact.append((norm - block[np.arange(len(block)), nxt[j:j + BLOCK]]).astype(np.float64))
        score(logits, nxt, scale[rows], floor[rows], steps[rows], own)
    log_ppl, log_ppl_se = _mean_and_uncertainty(np.concatenate(exact))
    ppl = _exp(log_ppl)
    ref = Reference(path, sha256, text, tokens, chunks, n_chunk, n_vocab, scale, floor, steps, ppl,
                    ppl * log_ppl_se if ppl is not None else None)
    ref.own = ref.quality(own)
    return ref


def compare(reference: Reference, chunk_logits) -> Quality:
    """A file's logits over the reference's chunks, scored against the F16's stored log-probabilities."""
    sums = _Sums()
    for i, logits in enumerate(chunk_logits):
        rows = reference.rows(i)
        score(logits, np.asarray(reference.next_tokens(i)), reference.scale[rows], reference.floor[rows],
              reference.steps[rows], sums)
        if not sums.finite:
            break
    return reference.quality(sums)


def degenerate(tokens: list[int]) -> bool:
    """One token repeating through at least half of a generation of 8 or more tokens."""
    if len(tokens) < 8:
        return False
    longest = run = 1
    for a, b in zip(tokens, tokens[1:], strict=False):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return longest * 2 >= len(tokens)


def loops(tokens: list[int], tail: int = 4) -> bool:
    """Degenerate, or already ending in one repeated token: the reference is heading the same way."""
    return degenerate(tokens) or (len(tokens) >= tail and len(set(tokens[-tail:])) == 1)


def degenerates_alone(candidate: list[int], reference: list[int]) -> bool:
    """The quant collapses into one repeated token where the F16, given the same prompt, does not."""
    return degenerate(candidate) and not loops(reference)


def greedy_agreement(a: list[int], b: list[int], between: list[str]) -> GreedyAgreement:
    n = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b, strict=False))
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    return GreedyAgreement(between, n, same / n if n else None, a == b, first)


METHODS = {
    "degenerate": "a quant fails when one token repeats through half or more of its greedy output while the F16's "
                  "output on the same prompt neither does nor ends in one repeated token",
    "kld": "llama-perplexity's --kl-divergence, reimplemented over llama.cpp's logits: the evaluation text in chunks "
           "of ctx tokens, each from an empty KV cache with BOS first, the second half of each chunk scored; "
           "KL(P_F16 || P_file) in nats from the F16's log-probabilities stored at 16 bits as llama-perplexity "
           "stores them; mean ± standard error; percentiles over positions",
    "ppl": "exp(mean negative log-likelihood of the next token) over the same positions, ± its standard error "
           "(llama-perplexity's 'Final estimate: PPL' for the F16, 'Mean PPL(Q)' for a file)",
    "top1": "share of positions where the file's most likely token is the F16's (llama-perplexity's 'Same top p')",
    "rms_dp": "root mean square over positions of the change in the probability of the text's next token "
              "(llama-perplexity's 'RMS Δp')",
}
