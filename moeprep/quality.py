"""Quality: a quant's next-token distributions against the F16's, and output that collapses.

KL divergence and top-1 agreement are computed as llama-perplexity --kl-divergence reports them, from
logits of one llama.cpp eval over a fixed text. Tiny random-weight models loop by themselves, so the
F16 on the same prompt decides what counts as normal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .results import GreedyAgreement, Quality

QUALITY_TOKENS = 384  # positions compared: a few hundred, as llama-perplexity --kl-divergence scores per chunk

# Enough varied English for the demo's 512-piece tokenizer, and the fixed text quality is measured on.
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

TEXT_SHA256 = hashlib.sha256(TEXT.encode()).hexdigest()


def kl_divergence(reference, candidate) -> dict:
    """Per-position KL(P_ref || P_q) and top-1 agreement over two [positions, vocab] logit arrays."""
    import numpy as np

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    if not bool(np.isfinite(candidate).all()):
        return {"finite": False}
    lp, lq = log_softmax(reference), log_softmax(candidate)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return {
        "finite": True,
        "kld_mean": float(kld.mean()),
        "kld_sd": float(kld.std(ddof=1)) if len(kld) > 1 else 0.0,
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1_agreement": float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()),
        "positions": int(len(kld)),
    }


def compare(reference: Reference, candidate_logits) -> Quality:
    return Quality(reference=reference.path, reference_sha256=reference.sha256, text_sha256=TEXT_SHA256,
                   **kl_divergence(reference.logits, candidate_logits))


def degenerate(tokens: list[int]) -> bool:
    """One token repeating through at least half of a generation of 8 or more tokens."""
    if len(tokens) < 8:
        return False
    longest = run = 1
    for a, b in zip(tokens, tokens[1:]):
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
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return GreedyAgreement(between, n, same / n if n else None, a == b, first)


@dataclass
class Reference:
    """The F16's logits over the fixed text and its greedy output: what every quant is compared with."""

    path: str
    sha256: str | None
    tokens: list[int]
    logits: object  # numpy array [positions, vocab]
    greedy_tokens: list[int]


METHODS = {
    "degenerate": "a quant fails when one token repeats through half or more of its greedy output while the F16's "
                  "output on the same prompt neither does nor ends in one repeated token",
    "kld": "per-position KL(P_F16 || P_quant) over the fixed text, natural log, logits from one llama.cpp eval",
}
