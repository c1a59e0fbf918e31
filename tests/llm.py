"""Load a GGUF with llama-cpp-python and generate: a file that exists but does not load is a failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def generate(path: Path, n: int = 8, prompt: bytes = b"The quick brown fox") -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=128, n_threads=2, n_batch=64, verbose=False, seed=0,
                logits_all=True)  # so llama-cpp-python copies the logits out for the check below
    try:
        tokens = []
        for token in llm.generate(llm.tokenize(prompt), temp=0.0):
            logits = llm.scores[llm.n_tokens - 1]
            assert np.isfinite(logits).all() and logits.any(), f"{path.name}: non-finite or empty logits"
            tokens.append(token)
            if len(tokens) == n:
                break
        return tokens
    finally:
        llm.close()
