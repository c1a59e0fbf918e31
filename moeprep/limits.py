"""The bounds every numeric input is checked against before work starts, in one place for the CLI and recipes.

They are far above any real use and far below what would wrap a C integer or exhaust a machine; what a model
or a machine allows (its trained context, its cores, its memory) is checked as well, where they are known.
"""

MAX_CTX = 2**24  # tokens: above every released model's trained context, far below llama.cpp's uint32 n_ctx
MAX_BATCH = 2**20  # tokens per (micro)batch
MAX_TOKENS = 8192  # tokens a smoke generates per run
MAX_RUNS = 100  # timed runs per placement
MAX_CHUNKS = 10**6  # chunks of an evaluation or calibration text
MAX_THREADS = 512  # GGML_MAX_N_THREADS
MAX_TIERS = 64  # GPU sizes in one tier table
MAX_SIZE = 2**50  # bytes in any size a user writes (1 PiB)
MAX_EVAL_TEXT = 64 * 2**20  # an evaluation text for quality (moeprep's own is 49 KB)
MAX_CALIBRATION_TEXT = 1024 * 2**20  # a calibration text for llama-imatrix
MAX_TEMPLATE = 1 * 2**20  # a card template
MAX_IMATRIX = 16 * 2**30  # an importance matrix (a 1T-parameter MoE's is a few GB)
MAX_CARD = 16 * 2**20  # a card to lint
MAX_CONFIG = 16 * 2**20  # a model's config.json or README.md
