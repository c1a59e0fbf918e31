"""Placements: where the expert tensors go, spelled as llama.cpp's own flags spell them.

`gpu` offloads every layer; `cpu-moe` is llama.cpp's `--cpu-moe` override; `n-cpu-moe=N` is
`--n-cpu-moe N`: the experts of blocks 0..N-1, leading dense blocks included (common/arg.cpp).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic_core import core_schema

from moeprep.errors import MoeprepError
from moeprep.inputs import short

# llama.cpp's --cpu-moe override; searched anywhere in a tensor name, so `.bias` matches too.
CPU_MOE_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_N_CPU_MOE = re.compile(r"n-cpu-moe=(\d+)")


def n_cpu_moe_patterns(n: int) -> list[str]:
    """llama.cpp's --n-cpu-moe N: one pattern per block 0..N-1."""
    return [rf"blk\.{i}{CPU_MOE_PATTERN}" for i in range(n)]


class Placement(str):
    """A placement as llama.cpp's flags spell it: "gpu", "cpu-moe", "n-cpu-moe=N". It is a str, so records, JSON
    and dict keys hold it as its name; `parse` makes one from text a user or a file gave, and records read back
    from JSON are parsed the same way."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return str(self)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            _validated, core_schema.str_schema(), serialization=core_schema.plain_serializer_function_ser_schema(str))

    @property
    def n_cpu_moe(self) -> int | None:
        m = _N_CPU_MOE.fullmatch(self.name)
        return int(m.group(1)) if m else None

    @property
    def patterns(self) -> list[str]:
        if self.name == "cpu-moe":
            return [CPU_MOE_PATTERN]
        n = self.n_cpu_moe
        return n_cpu_moe_patterns(n) if n is not None else []

    @property
    def order(self) -> int:
        """More of the model on the GPU sorts first: gpu, n-cpu-moe=1, 2, ..., cpu-moe."""
        return {"gpu": -1, "cpu-moe": 10**9}.get(self.name, self.n_cpu_moe or 0)

    def flags(self) -> list[str]:
        """The llama-server / llama-cli flags that give this placement."""
        if self.name == "cpu-moe":
            return ["--cpu-moe"]
        return ["--n-cpu-moe", str(self.n_cpu_moe)] if self.n_cpu_moe is not None else []


def _validated(text: str) -> Placement:
    try:
        return parse(text)
    except MoeprepError as e:  # pydantic reports ValueErrors as the record's validation error, with their location
        raise ValueError(e.message) from None


GPU = Placement("gpu")
CPU_MOE = Placement("cpu-moe")


def parse(text: str, block_count: int | None = None) -> Placement:
    """A placement name, checked; with `block_count`, N is bounded by the model's blocks."""
    text = str(text).strip()
    if text in ("gpu", "cpu-moe"):
        return Placement(text)
    if m := _N_CPU_MOE.fullmatch(text):
        n = int(m.group(1))
        if n < 1:
            raise MoeprepError(f"placement {short(text)}: N must be at least 1", "use gpu for no expert offload")
        limit = block_count if block_count is not None else MAX_BLOCKS
        if n > limit:
            what = f"the model has {block_count} blocks" if block_count is not None else f"no model has over {MAX_BLOCKS} blocks"
            raise MoeprepError(f"placement {short(text)}: N is larger than the block count ({what})",
                               f"use n-cpu-moe=1..{limit}, or cpu-moe for every block")
        return Placement(f"n-cpu-moe={n}")
    raise MoeprepError(f"unknown placement {short(text)}", "use gpu, cpu-moe or n-cpu-moe=N")


# A bound for placements parsed before the model is known (CLI, recipes); the largest released MoE
# models have under 100 blocks. The real bound, the model's block_count, is applied once it is read.
MAX_BLOCKS = 1024
