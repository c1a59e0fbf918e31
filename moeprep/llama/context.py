"""Models and contexts through libllama's C API (as llama-cpp-python binds it), made as llama-server makes them:
every layer offloaded, the placement's expert overrides applied, a persistent CPU threadpool attached; and a
Session on one, which tokenizes and generates greedily as llama-bench times it."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llama_cpp import llama_cpp as ll

from moeprep.errors import MoeprepError
from moeprep.llama.build import clib, lib_dir
from moeprep.llama.log import capture_log
from moeprep.records.results import FlashAttn


class BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    fn = clib().ggml_backend_cpu_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return fn()


def override_array(patterns: list[str]):
    """A NULL-terminated override array sending every tensor matching a pattern to the CPU buffer type,
    as llama.cpp's --cpu-moe / --n-cpu-moe do. The caller keeps it alive as long as the model."""
    cpu = cpu_buffer_type()
    array = (BuftOverride * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns, strict=False):
        slot.pattern = pattern.encode()
        slot.buft = cpu
    return array


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # enum llama_flash_attn_type
# llama-server's defaults (common/common.h at 0c1e570): what every figure is measured and predicted with
DEFAULT_BATCH, DEFAULT_UBATCH, DEFAULT_FLASH_ATTN = 2048, 512, FlashAttn.AUTO
CACHE_TYPES = ("f16", "q8_0", "q4_0")  # what llama-server's -ctk/-ctv take that moeprep sizes


@dataclass(frozen=True)
class ContextParams:
    """A context as llama-server makes one unless the user says otherwise.

    llama-server's defaults at 0c1e570: n_batch 2048, n_ubatch 512 (common/common.h); `--parallel` auto, which
    tools/server/server.cpp turns into 4 slots sharing one unified KV cache; a sliding-window cache no larger
    than the window (common's swa_full = false); flash attention auto; f16 K and V caches; one thread per
    physical core. llama_context_default_params() differs on several of these (1 sequence, swa_full true).
    """

    n_ctx: int
    n_batch: int = DEFAULT_BATCH
    n_ubatch: int = DEFAULT_UBATCH
    n_seq_max: int = 4
    kv_unified: bool = True
    swa_full: bool = False
    threads: int = 1
    flash_attn: str = DEFAULT_FLASH_ATTN
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"


@contextmanager
def loaded_model(path: Path, patterns: Sequence[str] = (), *, no_alloc: bool = False, log: list[str] | None = None,
                 what: str = "load") -> Iterator[object]:
    """A llama.cpp model with every layer offloaded and `patterns` sent to the CPU buffer type (--cpu-moe and
    --n-cpu-moe), freed when the block ends. With `no_alloc` nothing is allocated and no weight is read
    (load_mode none: mmap trips an assert there); llama.cpp only logs the buffers it would make. llama.cpp's
    log goes to `log` while the model loads."""


    lines = log if log is not None else []
    array = override_array(list(patterns)) if patterns else None
    with capture_log(lambda level, text: lines.append(text)):
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = -1
        if no_alloc:
            mp.no_alloc = True
            mp.load_mode = ll.LLAMA_LOAD_MODE_NONE
        if array is not None:
            mp.tensor_buft_overrides = ctypes.cast(array, ctypes.c_void_p)
        model = ll.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise MoeprepError(f"llama.cpp could not {what} {Path(path).name}: {last_error(lines)}",
                           "see `moeprep probe` for its layout")
    try:
        yield model
    finally:
        with capture_log(lambda level, text: None):  # freeing logs too, at debug level: not for the user's terminal
            ll.llama_model_free(model)
        del array  # only now may the override strings go


def ggml_type(name: str) -> int:

    return getattr(ll, f"GGML_TYPE_{name.upper()}")


@contextmanager
def new_context(model, params: ContextParams, *, log: list[str] | None = None, what: str = "make a context for",
                threadpool: bool = True) -> Iterator[object]:
    """A context on `model` made with `params`, with a CPU threadpool attached as llama.cpp's tools attach one
    (none where the context only sizes buffers), freed when the block ends; llama.cpp's log of its creation (the
    settings it applied, how it resolved flash attention, every buffer) goes to `log`."""


    lines = log if log is not None else []
    with capture_log(lambda level, text: lines.append(text)):
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = params.n_ctx, params.n_batch, params.n_ubatch
        cp.n_seq_max, cp.kv_unified, cp.swa_full = params.n_seq_max, params.kv_unified, params.swa_full
        cp.n_threads = cp.n_threads_batch = params.threads
        cp.flash_attn_type = FLASH_ATTN[params.flash_attn]
        cp.type_k, cp.type_v = ggml_type(params.cache_type_k), ggml_type(params.cache_type_v)
        cp.no_perf = False  # llama_perf_context counts only when asked to; llama-bench and the tools do ask
        ctx = ll.llama_init_from_model(model, cp)
    if not ctx:
        raise MoeprepError(f"llama.cpp could not {what} a context of {params.n_ctx} tokens: {last_error(lines)}",
                           "lower --ctx, --ubatch or --batch")
    pool = _threadpool(params.threads) if threadpool else None
    if pool:
        with capture_log(lambda level, text: None):  # llama.cpp announces the attachment; not for the terminal
            clib().llama_attach_threadpool(ctx, pool, None)
    try:
        yield ctx
    finally:
        with capture_log(lambda level, text: None):
            ll.llama_free(ctx)
        if pool:
            _cpu_lib().ggml_threadpool_free(pool)


class ThreadpoolParams(ctypes.Structure):
    """ggml.h's `struct ggml_threadpool_params` (GGML_MAX_N_THREADS is 512)."""

    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


def _cpu_lib():
    lib = ctypes.CDLL(str(lib_dir() / "libggml-cpu.so"))  # already loaded with libllama: this only finds it
    lib.ggml_threadpool_new.restype, lib.ggml_threadpool_new.argtypes = ctypes.c_void_p, [ctypes.POINTER(ThreadpoolParams)]
    lib.ggml_threadpool_free.restype, lib.ggml_threadpool_free.argtypes = None, [ctypes.c_void_p]
    return lib


def _threadpool(threads: int) -> int | None:
    """A persistent CPU threadpool as llama.cpp's common library attaches to every context it makes (llama-server,
    llama-cli, llama-perplexity: common_threadpools::init, with common_cpu_params' defaults: normal priority,
    polling level 50, any CPU). Without one, ggml makes and joins a disposable pool for every graph it computes."""
    base = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(ThreadpoolParams), ctypes.c_int]
    params = ThreadpoolParams()
    base.ggml_threadpool_params_init(ctypes.byref(params), threads)
    if not (lib := clib()).llama_attach_threadpool.argtypes:
        lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.llama_attach_threadpool.restype = None
    return _cpu_lib().ggml_threadpool_new(ctypes.byref(params)) or None


def last_error(lines: list[str]) -> str:
    """llama.cpp's own reason: its last line naming an error ("error loading model: missing tensor ..."),
    which comes before the generic "failed to load model"."""
    for words in (("error",), ("failed",)):
        if found := [line.strip() for line in lines if any(w in line.lower() for w in words)]:
            return found[-1]
    return "no reason logged"


@dataclass
class Generation:
    """One greedy generation from an empty KV cache, timed as llama-bench times: the prompt decoded as one batch
    and synchronised, then one decode per token. Wall-clock seconds, and llama.cpp's own counters beside them."""

    tokens: list[int]  # generated, the end-of-generation token excluded
    prompt_tokens: int
    prompt_s: float  # the prompt's decode, synchronised
    first_s: float  # from the start to the first token sampled: the prompt's decode and one sample
    decodes: int  # single-token decodes after the prompt
    decode_s: float  # from the first token sampled to the last
    llama_prompt: tuple[int, float]  # llama_perf_context: n_p_eval, t_p_eval_ms
    llama_decode: tuple[int, float]  # n_eval, t_eval_ms


class Session:
    """A loaded model and one context on it, as smoke measures them."""

    def __init__(self, model, ctx, params: ContextParams):

        self.model, self.ctx, self.params = model, ctx, params
        self.vocab = ll.llama_model_get_vocab(model)

    def check_fits(self, prompt: list[int], n_new: int) -> None:
        """The prompt as one batch and the tokens to generate, against the context: llama_decode would fail midway."""

        p = self.params
        if len(prompt) + n_new > p.n_ctx or len(prompt) > p.n_batch:
            raise MoeprepError(f"the prompt ({len(prompt)} tokens) and {n_new} tokens to generate do not fit a "
                               f"context of {p.n_ctx} tokens with a batch of {p.n_batch}",
                               f"give --ctx {len(prompt) + n_new} or more, or fewer --tokens")

    def tokenize(self, text: bytes) -> list[int]:
        return tokenize(self.vocab, text)

    def detokenize(self, tokens: list[int]) -> str:

        array = (ll.llama_token * max(1, len(tokens)))(*tokens)
        size = 64 + 32 * len(tokens)
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_detokenize(self.vocab, array, len(tokens), buf, size, False, False)
        if n < 0:  # -n bytes are needed
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_detokenize(self.vocab, array, len(tokens), buf, -n, False, False)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def prompt(self, prompt: list[int]) -> tuple[float, int, float]:
        """The prompt decoded as one batch from an empty KV cache, as llama-bench's pp test decodes it: wall seconds,
        and llama.cpp's own count and milliseconds."""


        self.check_fits(prompt, 0)
        ctx = self.ctx
        ll.llama_memory_clear(ll.llama_get_memory(ctx), False)
        ll.llama_perf_context_reset(ctx)
        array = (ll.llama_token * len(prompt))(*prompt)
        start = time.perf_counter()
        if (rc := clib().llama_decode(ctx, ll.llama_batch_get_one(array, len(prompt)))) != 0:
            raise MoeprepError(f"llama.cpp failed to decode the prompt (code {rc})", "raise --ctx or --batch")
        ll.llama_synchronize(ctx)
        seconds = time.perf_counter() - start
        perf = ll.llama_perf_context(ctx)
        return seconds, perf.n_p_eval, perf.t_p_eval_ms

    def generate(self, prompt: list[int], n_new: int) -> Generation:
        """Greedy generation through the C API: clear the KV cache, decode the prompt as one batch, then decode
        each sampled token alone until `n_new` tokens or the end of generation."""


        self.check_fits(prompt, n_new)
        lib, ctx = clib(), self.ctx
        # The cells alone, as llama-bench clears between runs: zeroing the buffers too would push a small model's
        # weights out of the CPU's caches just before the timed decode.
        ll.llama_memory_clear(ll.llama_get_memory(ctx), False)
        ll.llama_perf_context_reset(ctx)
        # The greedy sampler alone: wrapped in a sampler chain it costs about 10 µs more per token at 0c1e570,
        # which a small model on a fast device shows as several per cent of its decode speed.
        greedy = ll.llama_sampler_init_greedy()
        prompt_array = (ll.llama_token * len(prompt))(*prompt)
        one = (ll.llama_token * 1)()
        # One batch struct for every step: it points at `one`, and llama.cpp assigns the positions itself.
        step = ll.llama_batch_get_one(one, 1)
        decode, sample, eog = lib.llama_decode, lib.llama_sampler_sample, lib.llama_vocab_is_eog
        tokens: list[int] = []
        try:
            start = time.perf_counter()
            if (rc := decode(ctx, ll.llama_batch_get_one(prompt_array, len(prompt)))) != 0:
                raise MoeprepError(f"llama.cpp failed to decode the prompt (code {rc})", "lower --tokens or raise --ctx")
            ll.llama_synchronize(ctx)
            prompted = time.perf_counter()
            token = sample(greedy, ctx, -1)
            first = time.perf_counter()
            decodes = 0
            while not eog(self.vocab, token):
                tokens.append(token)
                if len(tokens) == n_new:
                    break
                one[0] = token
                if (rc := decode(ctx, step)) != 0:
                    raise MoeprepError(f"llama.cpp failed to decode token {len(tokens) + 1} (code {rc})",
                                       "lower --tokens or raise --ctx")
                decodes += 1
                token = sample(greedy, ctx, -1)  # reading the logits waits for the decode
            end = time.perf_counter()
            perf = ll.llama_perf_context(ctx)
        finally:
            ll.llama_sampler_free(greedy)
        return Generation(tokens, len(prompt), prompted - start, first - start, decodes, end - first,
                          (perf.n_p_eval, perf.t_p_eval_ms), (perf.n_eval, perf.t_eval_ms))


@contextmanager
def session(path: Path, patterns: list[str], params: ContextParams, log: list[str]) -> Iterator[Session]:
    """`path` loaded with every layer offloaded and `patterns` on the CPU, with one context of `params`."""
    with loaded_model(path, patterns, log=log) as model, new_context(model, params, log=log) as ctx:
        yield Session(model, ctx, params)


def tokenize(vocab, data: bytes) -> list[int]:
    """Text as llama.cpp's tools tokenize a prompt: common_tokenize(..., add_special=true, parse_special=false)."""

    n_max = len(data) + 16
    buf = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    if n < 0:  # more tokens than room: -n is how many
        n_max = -n
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    return list(buf[:n])
