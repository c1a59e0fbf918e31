"""quality: perplexity and KL divergence scored as llama-perplexity scores them, checked against llama-perplexity."""

import hashlib
import math
import os
import re
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import moeprep
from moeprep import hardware as gpu
from moeprep.cli import main
from moeprep.llama.build import program
from moeprep.llama.evaluate import chunking
from moeprep.quality import scoring as quality
from moeprep.quality.text import EVAL_TEXT, eval_text
from moeprep.records.results import SmokeSettings
from moeprep.stages import measure

ROOT = Path(__file__).resolve().parent.parent
EVAL = Path(moeprep.__file__).parent / "data" / EVAL_TEXT
CTX, CHUNKS = 128, 4  # 4 * 63 = 252 positions: llama-perplexity prints its final statistics from 100 on


def llama_perplexity(*args, needs: str) -> str:
    """Its output, which must hold `needs`.

    At this llama.cpp commit the log is written by a thread that the program does not wait for at exit
    (common/log.cpp leaks the logger on purpose, llama.cpp issue 22142), so the last lines can be lost: seen
    in 6 runs of 10 on 2 busy cores, where OpenMP's spinning threads starve the log thread. With OpenMP told
    to sleep instead of spin (OMP_WAIT_POLICY=PASSIVE: scheduling only, the arithmetic is the same) about 1
    run in 15 lost them; such a run is repeated."""
    exe = program("llama-perplexity")
    env = {**os.environ, "LD_LIBRARY_PATH": str(exe.parent), "OMP_WAIT_POLICY": "PASSIVE"}
    for _ in range(10):
        r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-3000:]
        if needs in log:
            return log
    raise AssertionError(f"llama-perplexity's output lacks {needs!r} ten times:\n{log[-3000:]}")


def number(pattern: str, log: str) -> float:
    m = re.search(pattern, log)
    assert m, f"{pattern!r} not in llama-perplexity's output:\n{log[-3000:]}"
    return float(m.group(1))


def test_quality_agrees_with_llama_perplexity(converted_phimoe, tmp_path):
    """The same files, text and chunking through `llama-perplexity --kl-divergence-base` / `--kl-divergence`
    from the llama.cpp build moeprep runs: perplexity and mean KLD within 1 % relative."""
    settings = SmokeSettings(threads=gpu.physical_cores(), quality_ctx=CTX, quality_chunks=CHUNKS, new_tokens=2)
    f16 = converted_phimoe / "tiny-phimoe-F16.gguf"
    ref = measure.reference_for(f16, None, settings, eval_text())
    assert ref.chunks == CHUNKS and ref.own.positions == CHUNKS * (CTX - 1 - CTX // 2)
    assert ref.chunking.n_seq == 2048 // CTX  # every chunk in one decode, one sequence each

    base = tmp_path / "base.kld"
    common = ["-c", CTX, "-b", settings.n_batch, "-ub", settings.n_ubatch, "-t", settings.threads,
              "-fa", settings.flash_attn]
    log = llama_perplexity("-m", f16, "-f", EVAL, "--chunks", CHUNKS, "--kl-divergence-base", base, *common,
                           needs="Final estimate")
    ppl_f16 = number(r"Final estimate: PPL = ([\d.]+)", log)
    assert ref.ppl == pytest.approx(ppl_f16, rel=0.01)
    for quant in ("Q8_0", "Q4_K_M", "Q2_K"):
        ours = measure.quality_of(converted_phimoe / f"tiny-phimoe-{quant}.gguf", ref, settings)
        log = llama_perplexity("-m", converted_phimoe / f"tiny-phimoe-{quant}.gguf", "--kl-divergence-base", base,
                               "--kl-divergence", *common, needs="Same top p:")
        # llama-perplexity prints 6 decimals: Q8_0's ~3e-5 is known to its last digit only
        assert ours.kld_mean == pytest.approx(number(r"Mean\s+KLD:\s+([\d.]+) ±", log), rel=0.01, abs=5e-7), quant
        assert ours.ppl == pytest.approx(number(r"Mean PPL\(Q\)\s+:\s+([\d.]+)", log), rel=0.01), quant
        assert ours.ppl_reference == pytest.approx(ppl_f16, rel=0.01)
        assert 100 * ours.top1_agreement == pytest.approx(number(r"Same top p:\s+([\d.]+)", log), abs=0.5), quant
        assert ours.kld_p99 == pytest.approx(number(r"99\.0%\s+KLD:\s+([\d.]+)", log), rel=0.01, abs=5e-7), quant
        assert ours.kld_max == pytest.approx(number(r"Maximum KLD:\s+([\d.]+)", log), rel=0.01, abs=5e-7), quant


def test_quality_does_not_depend_on_how_chunks_are_batched(converted_phimoe):
    """n_batch 64 < ctx: each chunk in two decodes, one chunk at a time; the figures are those of n_batch 2048
    (every chunk in one decode, sixteen at a time), up to float rounding."""
    f16, q4 = converted_phimoe / "tiny-phimoe-F16.gguf", converted_phimoe / "tiny-phimoe-Q4_K_M.gguf"
    results = []
    for n_batch in (2048, 64):
        settings = SmokeSettings(threads=gpu.physical_cores(), quality_ctx=CTX, quality_chunks=CHUNKS, n_batch=n_batch,
                                 new_tokens=2)
        ref = measure.reference_for(f16, None, settings, eval_text())
        results.append((ref.chunking, ref.ppl, measure.quality_of(q4, ref, settings)))
    (wide, ppl_wide, q_wide), (narrow, ppl_narrow, q_narrow) = results
    assert (wide.n_seq, wide.n_batch, narrow.n_seq, narrow.n_batch, narrow.n_ubatch) == (16, 2048, 1, 64, 64)
    assert (q_narrow.n_seq, q_narrow.n_batch, q_narrow.n_ubatch) == (1, 64, 64)
    assert ppl_narrow == pytest.approx(ppl_wide, rel=1e-4)
    assert q_narrow.kld_mean == pytest.approx(q_wide.kld_mean, rel=1e-2)
    assert q_narrow.ppl == pytest.approx(q_wide.ppl, rel=1e-4) and q_narrow.positions == q_wide.positions


def test_quality_scores_are_the_kl_divergence_of_the_distributions():
    """Independently of llama.cpp: the scores of random logits against a direct float64 computation. The F16's
    log-probabilities are stored at 16 bits (as llama-perplexity stores them), so KLD agrees closely, not exactly."""
    rng = np.random.default_rng(7)
    ref = rng.normal(0, 3, (300, 1000)).astype(np.float32)
    cand = (ref + rng.normal(0, 0.2, ref.shape)).astype(np.float32)
    nxt = rng.integers(0, 1000, 300)
    sums = quality._Sums()
    scale, floor, steps, _ = quality.base_log_probs(ref)
    quality.score(cand, nxt, scale, floor, steps, sums)
    got = quality.summarize(sums)

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(axis=1, keepdims=True) - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(cand)
    rows = np.arange(300)
    kld = (np.exp(lp) * (lp - lq)).sum(axis=1)
    assert got["kld_mean"] == pytest.approx(kld.mean(), rel=2e-3)
    assert got["kld_se"] == pytest.approx(kld.std() / math.sqrt(299), rel=0.02)
    assert got["kld_median"] == pytest.approx(np.median(kld), rel=5e-3)
    assert got["ppl"] == pytest.approx(math.exp(-lq[rows, nxt].mean()), rel=1e-5)
    assert got["top1_agreement"] == (ref.argmax(axis=1) == cand.argmax(axis=1)).mean()
    dp = np.exp(lq[rows, nxt]) - np.exp(lp[rows, nxt])
    assert got["rms_dp"] == pytest.approx(math.sqrt((dp ** 2).mean()), rel=2e-3)
    assert got["positions"] == 300

    same = quality._Sums()
    quality.score(ref, nxt, scale, floor, steps, same)
    assert quality.summarize(same)["kld_mean"] < 1e-6  # a file against itself: the storage's floor

    broken = quality._Sums()
    quality.score(np.full_like(cand, np.nan), nxt, scale, floor, steps, broken)
    assert quality.summarize(broken) == {"finite": False}


@pytest.mark.parametrize("ctx, n_batch, n_ubatch, want", [
    (512, 2048, 512, (4, 2048, 512)),  # llama-perplexity's defaults: four chunks per decode
    (768, 2048, 512, (2, 1536, 512)),  # n_batch capped at n_seq * ctx
    (4096, 2048, 512, (1, 2048, 512)),  # a chunk takes two decodes
    (128, 64, 512, (1, 64, 64)),  # llama.cpp caps n_ubatch at n_batch
])
def test_quality_chunking_follows_llama_perplexity(ctx, n_batch, n_ubatch, want):
    c = chunking(ctx, n_batch, n_ubatch)
    assert (c.n_seq, c.n_batch, c.n_ubatch) == want
    assert c.n_ctx == c.n_seq * ctx and c.first == ctx // 2 and c.scored == ctx - 1 - ctx // 2


def test_quality_text_too_short_is_one_clear_line(converted_phimoe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to score a single chunk of the text.\n")
    f16 = converted_phimoe / "tiny-phimoe-F16.gguf"
    result = CliRunner().invoke(main, ["smoke", str(converted_phimoe / "tiny-phimoe-Q8_0.gguf"), "--reference", str(f16),
                                       "--quality-text", str(short), "--runs", "1", "--placement", "gpu"])
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: the evaluation text short\.txt is \d+ tokens for this model; chunks of 512 tokens "
                        r"need at least 1024, as in llama-perplexity \(lower --quality-ctx, or give a longer "
                        r"--quality-text\)", result.stderr.strip().splitlines()[-1]), result.stderr
    assert "Traceback" not in result.output


def test_quality_eval_text_is_shipped_written_for_moeprep_and_not_the_calibration_text():
    text = eval_text()
    raw = EVAL.read_bytes()
    assert (text.name, text.sha256, text.data) == (EVAL_TEXT, hashlib.sha256(raw).hexdigest(), raw[:-1])
    assert len(raw.decode().split()) >= 6000
    calibration = (ROOT / "recipes/calibration/general-en.txt").read_text()
    sentences = {s.strip() for s in re.split(r"[.!?]\s", calibration) if len(s.strip()) > 30}
    assert not [s for s in sentences if s in raw.decode()]
    assert "License: MIT" in (EVAL.parent / "README.md").read_text()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "data/*.txt" in package_data["moeprep"]  # in the wheel, beside the code
