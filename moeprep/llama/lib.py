"""The few native libllama calls moeprep makes through llama-cpp-python, each behind one function."""

from __future__ import annotations

import ctypes
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

LogLine = Callable[[int, str], None]  # (ggml log level, text)


def _lib():
    from llama_cpp import llama_cpp

    return llama_cpp._lib


def lib_dir() -> Path:
    """Where llama-cpp-python loads libllama from: LLAMA_CPP_LIB_PATH if set (as llama-cpp-python reads it),
    else the package's lib/. scripts/setup puts llama.cpp's programs from the same build beside the libraries."""
    import llama_cpp

    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.__file__).parent / "lib"


def program(name: str) -> Path:
    """One of llama.cpp's programs (llama-imatrix, llama-perplexity, llama-bench) from the build libllama is."""
    from moeprep.errors import MoeprepError

    path = lib_dir() / name
    if not path.is_file():
        raise MoeprepError(f"{name} is missing from {path.parent}, the llama.cpp build moeprep runs",
                           "run scripts/setup, which builds llama.cpp's programs beside its libraries")
    return path


def build_info() -> dict:
    """What scripts/setup recorded of the llama.cpp build (commit, CMAKE_ARGS, backends); {} if it did not."""
    try:
        return json.loads((lib_dir() / "moeprep-build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def program_commits() -> dict[str, str | None]:
    """Each of llama.cpp's programs beside libllama and the commit it says it was built from (None: missing
    or silent), so `moeprep doctor` can show that one build serves everything."""
    import re
    import subprocess

    commits: dict[str, str | None] = {}
    for name in ("llama-imatrix", "llama-perplexity", "llama-bench"):
        path = lib_dir() / name
        try:
            out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            commits[name] = None
            continue
        found = re.search(r"^version: .*\bcommit ([0-9a-f]+)\)", out.stdout + out.stderr, re.MULTILINE)
        commits[name] = found.group(1) if found else None
    return commits


def _c_string(name: str) -> str | None:
    fn = getattr(_lib(), name, None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return fn().decode()


def versions() -> dict:
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        # ggml is built inside llama.cpp's tree, so its commit is llama.cpp's ("-dirty": files differ from it)
        "llama_cpp_commit": _c_string("ggml_commit"),
        "ggml": _c_string("ggml_version"),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        # the flags scripts/setup compiled that one build with (backends, CUDA architectures follow from them)
        "llama_cpp_cmake_args": " ".join(build_info().get("cmake_args", [])) or None,
    }


@contextmanager
def capture_log(on_line: LogLine) -> Iterator[None]:
    """Route llama.cpp's and ggml's log to `on_line` for the duration, then give it back to llama-cpp-python."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        on_line(level, text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        del callback  # only now may the ctypes thunk be collected


def file_types() -> dict[str, int]:
    """Every llama.cpp file type name (Q4_K_M, IQ2_XS, F16, ...) and its llama_ftype number."""
    import llama_cpp

    types = {}
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[name.removeprefix("LLAMA_FTYPE_MOSTLY_")] = getattr(llama_cpp, name)
    types["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    return dict(sorted(types.items(), key=lambda kv: kv[1]))


class BuftOverride(ctypes.Structure):
    """llama.h's `struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }`."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_buffer_type() -> int:
    fn = _lib().ggml_backend_cpu_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return fn()


def override_array(patterns: list[str]):
    """A NULL-terminated override array sending every tensor matching a pattern to the CPU buffer type,
    as llama.cpp's --cpu-moe / --n-cpu-moe do. The caller keeps it alive as long as the model."""
    cpu = cpu_buffer_type()
    array = (BuftOverride * (len(patterns) + 1))()
    for slot, pattern in zip(array, patterns):
        slot.pattern = pattern.encode()
        slot.buft = cpu
    return array


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # enum llama_flash_attn_type
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
    n_batch: int = 2048
    n_ubatch: int = 512
    n_seq_max: int = 4
    kv_unified: bool = True
    swa_full: bool = False
    threads: int = 1
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"


@contextmanager
def loaded_model(path: Path, patterns: list[str] = (), *, no_alloc: bool = False, log: list[str] | None = None,
                 what: str = "load") -> Iterator[object]:
    """A llama.cpp model with every layer offloaded and `patterns` sent to the CPU buffer type (--cpu-moe and
    --n-cpu-moe), freed when the block ends. With `no_alloc` nothing is allocated and no weight is read
    (load_mode none: mmap trips an assert there); llama.cpp only logs the buffers it would make. llama.cpp's
    log goes to `log` while the model loads."""
    from llama_cpp import llama_cpp as ll

    from moeprep.errors import MoeprepError

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
    from llama_cpp import llama_cpp as ll

    return getattr(ll, f"GGML_TYPE_{name.upper()}")


@contextmanager
def new_context(model, params: ContextParams, *, log: list[str] | None = None, what: str = "make a context for",
                threadpool: bool = True) -> Iterator[object]:
    """A context on `model` made with `params`, with a CPU threadpool attached as llama.cpp's tools attach one
    (none where the context only sizes buffers), freed when the block ends; llama.cpp's log of its creation (the
    settings it applied, how it resolved flash attention, every buffer) goes to `log`."""
    from llama_cpp import llama_cpp as ll

    from moeprep.errors import MoeprepError

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
            _lib().llama_attach_threadpool(ctx, pool, None)
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
    if not (lib := _lib()).llama_attach_threadpool.argtypes:
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


def devices() -> list[dict]:
    """The ggml backend devices compiled in (CPU, CUDA0, ...), with memory where the backend reports it."""
    lib = _lib()
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    kinds = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}  # enum ggml_backend_dev_type
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": lib.ggml_backend_dev_name(dev).decode(),
            "description": lib.ggml_backend_dev_description(dev).decode(),
            "type": kinds.get(lib.ggml_backend_dev_type(dev), "UNKNOWN"),
            "memory_free": free.value,
            "memory_total": total.value,
        })
    return out


def backends(devs: list[dict] | None = None) -> list[str]:
    """Backend names without device numbers: ["CPU"], ["CUDA"], ..."""
    return sorted({d["name"].rstrip("0123456789") for d in (devs if devs is not None else devices())})



def simulate_context(path, *, patterns: list[str], params: ContextParams) -> str:
    """llama.cpp's own sizing of every buffer for `path`, with nothing allocated and no weight read.

    The model is loaded with `no_alloc`, every layer offloaded and the placement's overrides applied, then a
    context is created: llama.cpp reserves its worst-case graphs and logs each buffer's size, as
    llama-fit-params does. Returns the captured log.
    """
    lines: list[str] = []
    with loaded_model(path, patterns, no_alloc=True, log=lines, what="load to size the buffers of") as model:
        with new_context(model, params, log=lines, what="size", threadpool=False):
            pass
    return "".join(lines)


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
        from llama_cpp import llama_cpp as ll

        self.model, self.ctx, self.params = model, ctx, params
        self.vocab = ll.llama_model_get_vocab(model)

    def check_fits(self, prompt: list[int], n_new: int) -> None:
        """The prompt as one batch and the tokens to generate, against the context: llama_decode would fail midway."""
        from moeprep.errors import MoeprepError

        p = self.params
        if len(prompt) + n_new > p.n_ctx or len(prompt) > p.n_batch:
            raise MoeprepError(f"the prompt ({len(prompt)} tokens) and {n_new} tokens to generate do not fit a "
                               f"context of {p.n_ctx} tokens with a batch of {p.n_batch}",
                               f"give --ctx {len(prompt) + n_new} or more, or fewer --tokens")

    def tokenize(self, text: bytes) -> list[int]:
        return tokenize(self.vocab, text)

    def detokenize(self, tokens: list[int]) -> str:
        from llama_cpp import llama_cpp as ll

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
        from llama_cpp import llama_cpp as ll

        from moeprep.errors import MoeprepError

        self.check_fits(prompt, 0)
        ctx = self.ctx
        ll.llama_memory_clear(ll.llama_get_memory(ctx), False)
        ll.llama_perf_context_reset(ctx)
        array = (ll.llama_token * len(prompt))(*prompt)
        start = time.perf_counter()
        if (rc := _lib().llama_decode(ctx, ll.llama_batch_get_one(array, len(prompt)))) != 0:
            raise MoeprepError(f"llama.cpp failed to decode the prompt (code {rc})", "raise --ctx or --batch")
        ll.llama_synchronize(ctx)
        seconds = time.perf_counter() - start
        perf = ll.llama_perf_context(ctx)
        return seconds, perf.n_p_eval, perf.t_p_eval_ms

    def generate(self, prompt: list[int], n_new: int) -> Generation:
        """Greedy generation through the C API: clear the KV cache, decode the prompt as one batch, then decode
        each sampled token alone until `n_new` tokens or the end of generation."""
        from llama_cpp import llama_cpp as ll

        from moeprep.errors import MoeprepError

        self.check_fits(prompt, n_new)
        lib, ctx = _lib(), self.ctx
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
    import llama_cpp as ll

    n_max = len(data) + 16
    buf = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    if n < 0:  # more tokens than room: -n is how many
        n_max = -n
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
    return list(buf[:n])
