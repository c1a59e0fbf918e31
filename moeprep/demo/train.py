"""The demo's model: the tiny checkpoint of demo.py, trained briefly on the shipped calibration text.

Random weights make every quality figure noise and every generation a loop. Training the same
architecture for 120 steps (about 25 s on 2 idle CPU cores) on recipes/calibration/general-en.txt gives a
model that continues text from that domain, so the demo's sample text and its Q8_0 < Q4_K_M < Q2_K
ordering mean something. The tokenizer is trained on the same text.

The result is cached under `<cache>/demo/<kind>-<key>/`, `<cache>` being $MOEPREP_CACHE, else
$XDG_CACHE_HOME/moeprep, else ~/.cache/moeprep (as scripts/build-llama), and `key` a hash of everything
that goes into it: the text's sha256, the config, the schedule (steps, seed, threads...) and the versions
of torch, transformers and sentencepiece. It is written to a `.partial-<pid>` folder beside it and renamed
when complete, so the second demo starts at once and a killed one leaves nothing that looks finished.
Fixed seeds and a fixed thread count make a run deterministic on a given machine and torch build.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from moeprep import progress
from moeprep.assets import calibration
from moeprep.demo import model as demo
from moeprep.errors import MoeprepError
from moeprep.files import remove
from moeprep.records.outcome import Status, quiet

RECORD = "moeprep-training.json"  # in the checkpoint: the key and how training went; the converter ignores it
FORMAT = 2  # 2: the tokenizer config carries a chat template. Bump when the way a model is trained changes in a way the schedule does not show


@dataclass(frozen=True)
class Schedule:
    steps: int = 120
    batch: int = 8  # sequences per step
    seq: int = 128  # tokens per sequence
    lr: float = 3e-3  # AdamW peak, after a linear warm-up, then cosine down to a tenth
    warmup: int = 10
    seed: int = 0
    threads: int = 2  # fixed, not the machine's count: CPU kernels may sum in another order on another count
    vocab: int = 1024  # sentencepiece pieces, trained on the same text


DEFAULT = Schedule()


@dataclass
class Trained:
    path: Path  # the cached checkpoint
    key: str
    cached: bool  # found in the cache: nothing was trained
    loss_before: float  # mean next-token loss over the whole text, random weights
    loss_after: float  # the same, trained
    seconds: float  # training time of the run that made it


def cache_root() -> Path:
    if explicit := os.environ.get("MOEPREP_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeprep"


def key(kind: str, schedule: Schedule, text: str) -> str:
    inputs = {"format": FORMAT, "kind": kind, "config": demo.model_config(kind, schedule.vocab), "schedule": asdict(schedule),
              "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "torch": torch.__version__,
              "transformers": transformers.__version__, "sentencepiece": sentencepiece.__version__}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def trained(kind: str, schedule: Schedule | None = None, *, cache: Path | None = None, text: Path | None = None,
            status: Status = quiet) -> Trained:
    """The trained `kind` checkpoint from the cache, trained and cached first if it is not there."""
    schedule = schedule or DEFAULT
    text_path = Path(text) if text else calibration()
    corpus = text_path.read_text(encoding="utf-8")
    k = key(kind, schedule, corpus)
    folder = Path(cache or cache_root()) / "demo" / f"{kind}-{k[:16]}"
    if (record := _record(folder)) is not None and record.get("key") == k:
        return Trained(folder, k, True, record["loss_before"], record["loss_after"], record["seconds"])
    status(f"training the demo's tiny {kind} on {text_path.name} ({schedule.steps} steps on {schedule.threads} "
           f"threads, once; cached in {folder})")
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        _clean(folder)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise MoeprepError(f"cannot write the demo's model cache at {folder.parent}: {e.strerror}",
                           "set MOEPREP_CACHE to a writable folder") from None
    try:
        result = _train(kind, schedule, corpus, text_path.name, k, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another run cached the same key meanwhile: its copy is as good as ours
            if _record(folder) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise MoeprepError(f"the disk filled up while writing the demo's model into {folder.parent}",
                               "free some space, or set MOEPREP_CACHE to a folder on another disk") from e
        raise
    status(f"trained in {result['seconds']:.0f} s: loss over the text {result['loss_before']:.2f} -> "
           f"{result['loss_after']:.2f}")
    return Trained(folder, k, False, result["loss_before"], result["loss_after"], result["seconds"])


def replace_folder(src: Path, dest: Path) -> None:
    """Copy the folder `src` to `dest`, replacing what is there: copied aside, then renamed into place. A link in
    `dest`'s place is removed, never followed."""
    dest = Path(dest)
    tmp, old = dest.with_name(dest.name + ".partial"), dest.with_name(dest.name + ".old")
    for leftover in (tmp, old):
        remove(dest.parent, leftover)
    shutil.copytree(src, tmp)
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        os.rename(dest, old)
    os.rename(tmp, dest)
    remove(dest.parent, old)


def _clean(folder: Path) -> None:
    """Remove what killed runs left for this key: `.partial-<pid>` folders of dead processes, and a folder
    under the final name without its record (nothing moeprep renames there is incomplete, but a hand may be)."""
    for partial in folder.parent.glob(f"{folder.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)
    if folder.exists() and _record(folder) is None:
        shutil.rmtree(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _paragraphs(corpus: str) -> list[str]:
    """The text's paragraphs, each on one line (sentencepiece reads newlines as spaces anyway)."""
    return [" ".join(p.split()) for p in corpus.split("\n\n") if p.strip()]


def _train(kind: str, schedule: Schedule, corpus: str, text_name: str, k: str, folder: Path) -> dict:
    """Tokenizer, random start, training, and the trained checkpoint written into `folder`."""
    paragraphs = _paragraphs(corpus)
    vocab = demo.make_tokenizer(folder, schedule.vocab, paragraphs)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # each paragraph after a BOS, as llama.cpp starts a prompt
    ids = torch.tensor([t for p in paragraphs for t in [1, *sp.encode(p)]])
    if len(ids) <= schedule.seq:
        raise MoeprepError(f"the calibration text {text_name} is too short to train on ({len(ids)} tokens)",
                           f"give one of more than {schedule.seq} tokens")
    config = demo.model_config(kind, vocab)
    start = demo.random_tensors(config, schedule.seed)
    init = folder / "init"
    init.mkdir()
    demo.write(init, kind, config, start, "")

    with _quiet_transformers(), _threads(schedule.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(schedule.seed)  # router and input jitter (Phi-MoE) draw from the global generator
        model = _load(init, config)
        shutil.rmtree(init)
        loss_before = _loss(model, ids, schedule.seq)
        began = time.monotonic()
        _fit(model, ids, schedule, progress.bar(f"training tiny-{kind}", schedule.steps, unit="step"))
        seconds = time.monotonic() - began
        loss_after = _loss(model, ids, schedule.seq)
        tensors = _original_layout(model, folder / "hf", start)

    readme = (f"A tiny {config['architectures'][0]} made by moeprep's demo and trained for {schedule.steps} steps "
              f"on moeprep's calibration text {text_name} (mean next-token loss {loss_before:.2f} -> "
              f"{loss_after:.2f}). It continues text from that page and knows nothing else.")
    demo.write(folder, kind, config, tensors, readme)
    result = {"key": k, "kind": kind, "schedule": asdict(schedule), "text": text_name,
              "text_sha256": hashlib.sha256(corpus.encode()).hexdigest(), "tokens": len(ids),
              "loss_before": loss_before, "loss_after": loss_after, "seconds": round(seconds, 1)}
    (folder / RECORD).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _load(folder: Path, config: dict):
    # grouped_mm: the experts as one grouped matmul; the default loops over experts and costs ~3x as much here
    extra = {"experts_implementation": "grouped_mm"} if config.get("num_local_experts") else {}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **extra)


def _fit(model, ids, schedule: Schedule, bar) -> None:
    gen = torch.Generator().manual_seed(schedule.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)

    def factor(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        done = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    with bar:
        for _ in range(schedule.steps):
            starts = torch.randint(0, len(ids) - schedule.seq, (schedule.batch,), generator=gen)
            x = torch.stack([ids[s:s + schedule.seq] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.2f}", refresh=False)
            bar.update(1)
    model.eval()


def _loss(model, ids, seq: int) -> float:
    """Mean next-token loss over the whole text, in windows of `seq` tokens, routing as at inference."""
    model.eval()
    windows = [ids[i:i + seq] for i in range(0, len(ids) - 1, seq)]
    total = count = 0.0
    with torch.no_grad():
        for w in windows:
            if len(w) < 2:
                continue
            loss = model(input_ids=w[None], labels=w[None]).loss
            total += loss.item() * (len(w) - 1)
            count += len(w) - 1
    return round(total / count, 4)


def _original_layout(model, scratch: Path, start: dict) -> dict:
    """The trained weights under the checkpoint's own tensor names, in bfloat16 like the config says.

    transformers 5 fuses each layer's experts into 3-D tensors when it loads; save_pretrained writes them back
    one tensor per expert, under the names the converter reads."""
    model.save_pretrained(str(scratch))
    tensors = {}
    for shard in sorted(scratch.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    shutil.rmtree(scratch)
    if set(tensors) != set(start):
        missing, extra = sorted(set(start) - set(tensors))[:3], sorted(set(tensors) - set(start))[:3]
        raise RuntimeError(f"transformers saved other tensor names than the checkpoint's: missing {missing}, "
                           f"extra {extra}")
    return {name: tensors[name].to(torch.bfloat16).contiguous() for name in start}


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No rope-parameter warnings or weight-loading bars from transformers: moeprep's own bar shows progress."""
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
