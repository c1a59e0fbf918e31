"""Per-tensor quant types: `PATTERN=TYPE` rules and the named mixes moeprep ships.

llama.cpp applies the rules itself (llama_model_quantize_params.tt_overrides): for each tensor it may
quantize, it tries them in order with std::regex_search on the tensor's name, and the first that matches
sets the type; the file type's own per-tensor choices are then skipped for that tensor (src/llama-quant.cpp,
llama_tensor_get_type). Rules do nothing when the file type is not a quantized one (F16, BF16, F32).

Everything here is pure: no llama.cpp, no files. The pipeline hands in the tensor names it read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moeprep.errors import MoeprepError

# What ggml_quantize_chunk can write (ggml/src/ggml.c); any other ggml type (Q8_K, I8, F64, ...) aborts llama.cpp.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_XS",
                "IQ4_NL", "MXFP4", "NVFP4", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "Q2_0",
                "IQ1_M", "IQ1_S", "Q1_0", "TQ2_0", "TQ1_0")
# Types llama.cpp refuses to write without an importance matrix (tensor_requires_imatrix in llama-quant.cpp).
TYPES_NEED_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}
UNQUANTIZED = {"F32", "F16", "BF16"}
EXAMPLE = "e.g. 'attn_.*=Q8_0' or 'ffn_down_exps=Q5_K'"


@dataclass(frozen=True)
class Rule:
    pattern: str  # a regular expression searched in each tensor name
    type: str  # a ggml tensor type as gguf-py spells it: Q8_0, Q4_K, F16
    what: str = field(default="", compare=False)  # the tensors it is meant for, in words (for notes)

    def __str__(self) -> str:
        return f"{self.pattern}={self.type}"


@dataclass(frozen=True)
class Mix:
    name: str
    base: str  # the llama.cpp file type: every tensor no rule matches gets its per-tensor choice
    rules: tuple[Rule, ...]
    about: str


@dataclass(frozen=True)
class Target:
    """One output of a quantize run."""

    label: str  # the manifest's quant and the file name's suffix: Q4_K_M, moe-q4
    ftype: str  # the llama.cpp file type it is made as
    rules: tuple[Rule, ...] = ()  # in the order llama.cpp tries them
    mix: str | None = None

    @property
    def needs_imatrix(self) -> bool:
        from moeprep.stages.quantize import NEEDS_IMATRIX

        return self.ftype in NEEDS_IMATRIX or any(r.type in TYPES_NEED_IMATRIX for r in self.rules)


# Routers (ffn_gate_inp) are absent on purpose: llama.cpp never quantizes them (tensor_allows_quantization),
# so they stay as converted whatever a rule says.
MIXES = {mix.name: mix for mix in (
    Mix("moe-q4", "Q4_K_M", (
        Rule("ffn_down_exps", "Q5_K", "the routed experts' down projections"),
        Rule("ffn_(gate|up|gate_up)_exps", "Q4_K", "the routed experts' gate and up projections"),
        Rule("_shexp", "Q8_0", "shared experts"),
        Rule("attn_", "Q8_0", "attention"),
        Rule(r"^output\.weight$", "Q6_K", "the output layer"),
    ), "routed experts at 4-5 bits; attention and shared experts, which every token uses, at 8"),
    Mix("moe-q3", "Q3_K_M", (
        Rule("ffn_down_exps", "Q4_K", "the routed experts' down projections"),
        Rule("ffn_(gate|up|gate_up)_exps", "Q3_K", "the routed experts' gate and up projections"),
        Rule("_shexp", "Q8_0", "shared experts"),
        Rule("attn_", "Q6_K", "attention"),
        Rule(r"^output\.weight$", "Q6_K", "the output layer"),
    ), "routed experts at 3-4 bits; attention at 6 and shared experts at 8"),
)}


def get(name: str) -> Mix:
    mix = MIXES.get(name.lower())
    if mix is None:
        raise MoeprepError(f"unknown mix {name!r}", f"moeprep ships {', '.join(MIXES)}")
    return mix


def parse(text: str) -> Rule:
    """`PATTERN=TYPE` as llama-quantize's --tensor-type takes it; the type is checked here, the pattern compiled."""
    from gguf import GGMLQuantizationType, LlamaFileType

    pattern, sep, name = str(text).rpartition("=")  # a type never holds '=', a pattern may
    if not sep or not pattern or not name:
        raise MoeprepError(f"tensor-type rule {text!r} is not PATTERN=TYPE", EXAMPLE)
    try:
        re.compile(pattern)
    except re.error as e:
        raise MoeprepError(f"tensor-type rule {text!r}: bad pattern ({e})",
                           f"PATTERN is a regular expression searched in each tensor name, {EXAMPLE}") from None
    kind = name.upper()
    if kind not in TENSOR_TYPES:
        if f"MOSTLY_{kind}" in LlamaFileType.__members__:
            why = f"{kind} is a file type, not a tensor type"
        elif kind in GGMLQuantizationType.__members__:
            why = f"llama.cpp does not quantize to {kind}"
        else:
            why = f"unknown tensor type {name!r}"
        raise MoeprepError(f"tensor-type rule {text!r}: {why}", f"tensor types: {', '.join(TENSOR_TYPES)}")
    return Rule(pattern, kind)


def targets(quants: list[str], mixes: list[str] = (), rules: list[str] = ()) -> list[Target]:
    """Every output: the plain quants, then the mixes; the user's rules come first in each, so they win."""
    given = tuple(parse(r) for r in rules)
    out = [Target(q, q, given) for q in quants]
    for mix in dict.fromkeys(get(name) for name in mixes):
        out.append(Target(mix.name, mix.base, given + mix.rules, mix.name))
    for t in out:
        if t.rules and t.ftype in UNQUANTIZED:
            raise MoeprepError(f"tensor-type rules do nothing in a {t.ftype} file: llama.cpp applies them only "
                               "when quantizing", "choose a quant such as Q4_K_M, or drop the rules")
    return out


def quantizable(name: str, n_dims: int) -> bool:
    """What llama.cpp may quantize at all (tensor_allows_quantization, the checks that apply to these models)."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def notes(targets: list[Target], tensors: list[tuple[str, int]], file: str) -> list[str]:
    """A note for each rule no tensor llama.cpp quantizes matches: a tensor class the model lacks, or a typo.

    `tensors` are (name, number of dimensions). Patterns are searched with Python's re, which agrees with
    llama.cpp's std::regex (ECMAScript) on the plain patterns rules use.
    """
    names = [name for name, dims in tensors if quantizable(name, dims)]
    out = []
    for t in targets:
        for rule in t.rules:
            if any(re.search(rule.pattern, n) for n in names):
                continue
            if rule.what and t.mix:
                out.append(f"{t.mix}: {file} has no {rule.what} ({rule}); that rule changes nothing")
            else:
                out.append(f"tensor-type rule {rule} matches no tensor llama.cpp quantizes in {file}; it changes nothing")
    return list(dict.fromkeys(out))
