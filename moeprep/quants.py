"""What a run makes from the converted file, decided once: the quant types, the named mixes moeprep ships, the
per-tensor `PATTERN=TYPE` rules, which of them need an importance matrix, and each output's name (`QuantPlan`).

llama.cpp applies the rules itself (llama_model_quantize_params.tt_overrides): for each tensor it may
quantize, it tries them in order with std::regex_search on the tensor's name, and the first that matches
sets the type; the file type's own per-tensor choices are then skipped for that tensor (src/llama-quant.cpp,
llama_tensor_get_type). Rules do nothing when the file type is not a quantized one (F16, BF16, F32).

Nothing here reads a file: the stages hand in the tensor names they read. llama.cpp's list of file types
comes from the build (llama/build.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from moeprep.errors import MoeprepError
from moeprep.inputs import short
from moeprep.llama.build import file_types
from moeprep.records.manifest import ArtifactSettings

DEFAULT_QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")


# llama.cpp refuses these file types without an importance matrix (tensor_requires_imatrix in llama-quant.cpp).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}


# Approximate bits per weight of whole files, for the free-disk check only (never reported as a size).
BITS_PER_WEIGHT = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.5,
    "Q5_1": 6, "Q5_0": 5.5, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_1": 5, "Q4_0": 4.5, "IQ4_XS": 4.3,
    "IQ4_NL": 4.5, "MXFP4_MOE": 4.3, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "Q3_K_S": 3.5, "IQ3_M": 3.7,
    "IQ3_S": 3.5, "IQ3_XS": 3.3, "IQ3_XXS": 3.1, "Q2_K": 3.0, "IQ2_M": 2.7,
    "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,  # llama.cpp quantize help
}


class QuantizeError(MoeprepError):
    pass


class NeedsImatrix(QuantizeError):
    """Outputs llama.cpp refuses to make without an importance matrix, and none is given for them."""

    def __init__(self, labels: list[str]):
        super().__init__(f"{', '.join(labels)} need{'s' * (len(labels) == 1)} an importance matrix, and llama.cpp "
                         "refuses it without one", "give one (--imatrix, --imatrix-text, or the recipe's imatrix "
                         "quants), or choose other types")
        self.labels = labels


class NotMade(MoeprepError):
    """An importance matrix named for outputs the run does not make."""

    def __init__(self, labels: list[str]):
        super().__init__(f"the importance matrix is for {', '.join(labels)}, which is not made here",
                         "list every quant made with it among the quants")
        self.labels = labels


def check_types(names: list[str] | tuple[str, ...], allow_imatrix: bool = False) -> list[str]:
    """Normalise quant names; refuse unknown ones, and those that need an importance matrix unless one is given."""
    known = file_types()
    out = []
    for raw in names:
        name = raw.upper()
        if name not in known:
            raise QuantizeError(f"unknown quant type {short(raw)}", f"choose from {', '.join(known)}")
        if name in NEEDS_IMATRIX and not allow_imatrix:
            raise QuantizeError(
                f"{name} needs an importance matrix, and llama.cpp refuses it without one",
                "give a calibration text with --imatrix-text (or an imatrix with --imatrix), or choose Q2_K or larger",
            )
        if name not in out:
            out.append(name)
    return out


def planned_size(n_params: int, name: str, margin: float = 1.1) -> int:
    """Bytes of a file of this type, estimated; the margin covers a mix's larger tensors and the checks' caution."""
    base = MIXES[name].base if name in MIXES else name  # a mix is mostly its base type
    return int(n_params * BITS_PER_WEIGHT.get(base, 16) / 8 * margin)


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
        raise MoeprepError(f"unknown mix {short(name)}", f"moeprep ships {', '.join(MIXES)}")
    return mix


def parse(text: str) -> Rule:
    """`PATTERN=TYPE` as llama-quantize's --tensor-type takes it; the type is checked here, the pattern compiled."""
    pattern, sep, name = str(text).rpartition("=")  # a type never holds '=', a pattern may
    if not sep or not pattern or not name:
        raise MoeprepError(f"tensor-type rule {short(text)} is not PATTERN=TYPE", EXAMPLE)
    try:
        re.compile(pattern)
    except re.error as e:
        raise MoeprepError(f"tensor-type rule {short(text)}: bad pattern ({e})",
                           f"PATTERN is a regular expression searched in each tensor name, {EXAMPLE}") from None
    kind = name.upper()
    if kind not in TENSOR_TYPES:
        if f"MOSTLY_{kind}" in LlamaFileType.__members__:
            why = f"{kind} is a file type, not a tensor type"
        elif kind in GGMLQuantizationType.__members__:
            why = f"llama.cpp does not quantize to {kind}"
        else:
            why = f"unknown tensor type {short(name)}"
        raise MoeprepError(f"tensor-type rule {short(text)}: {why}", f"tensor types: {', '.join(TENSOR_TYPES)}")
    return Rule(pattern, kind)


def targets(quants: Sequence[str], mixes: Sequence[str] = (), rules: Sequence[str] = ()) -> list[Target]:
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


def artifact_name(model: str, label: str) -> str:
    return f"{model}-{label}.gguf"


@dataclass(frozen=True)
class ImatrixSpec:
    """The importance matrix some outputs are made with: computed from a calibration text, or a file given."""

    quants: tuple[str, ...]  # the labels made with it
    text: Path | None = None  # calibration text to compute it from (llama-imatrix)
    file: Path | None = None  # or this file, as `moeprep quantize --imatrix` takes one
    ctx: int = 512
    chunks: int = 0


@dataclass(frozen=True)
class QuantPlan:
    """Every file a run makes from the converted one, each with its llama.cpp file type, rules and mix, and which
    are made with the importance matrix. Built once, by `plan`, which checks everything before any work."""

    model: str
    outtype: str  # the converted type: f16, bf16, f32
    targets: tuple[Target, ...]
    imatrix: ImatrixSpec | None = None
    notes: tuple[str, ...] = ()  # what the user should know about what was asked

    @property
    def base(self) -> str:
        return artifact_name(self.model, self.outtype.upper())

    def path(self, target: Target) -> str:
        return artifact_name(self.model, target.label)

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.targets]

    def uses_imatrix(self, target: Target) -> bool:
        return self.imatrix is not None and target.label in self.imatrix.quants

    def settings(self, target: Target, imatrix_sha256: str | None = None) -> ArtifactSettings:
        """What, besides the converted file, decides this output's bytes (the importance matrix by its sha256)."""
        return ArtifactSettings(ftype=target.ftype, imatrix=imatrix_sha256 if self.uses_imatrix(target) else None,
                                mix=target.mix, tensor_types=[str(r) for r in target.rules])

    def sizes(self, n_params: int, margin: float = 1.1) -> dict[str, int]:
        """Estimated bytes of the converted file and of every output, for disk checks and capacity plans."""
        converted = n_params * (4 if self.outtype == "f32" else 2)
        return {self.base: converted} | {self.path(t): planned_size(n_params, t.label, margin) for t in self.targets}


def plan(model: str, quants: list[str] | tuple[str, ...] = DEFAULT_QUANTS, mixes: list[str] | tuple[str, ...] = (),
         tensor_types: list[str] | tuple[str, ...] = (), *, outtype: str = "f16", imatrix: ImatrixSpec | None = None,
         dry_run: bool = False, converted: bool = True) -> QuantPlan:
    """The one place that checks what is asked for: known types, mixes and rules, nothing twice, the converted type
    left out where the run converts (`converted`: that file is made by the conversion), and an importance matrix for everything llama.cpp refuses without one
    (on a dry run, a note says so instead)."""
    notes: list[str] = []
    checked = check_types(list(quants), allow_imatrix=True)
    if converted and outtype.upper() in checked:  # quantizing it would overwrite the converted file
        notes.append(f"{outtype.upper()} is the converted file itself; nothing to quantize")
        checked = [q for q in checked if q != outtype.upper()]
    made = tuple(targets(checked, list(mixes), list(tensor_types)))
    if imatrix is not None:
        known = {t.label.lower(): t.label for t in made}
        labels = tuple(known.get(n.lower(), n.upper()) for n in imatrix.quants)
        if stray := [n for n in labels if n not in known.values()]:
            raise NotMade(stray)
        imatrix = ImatrixSpec(labels, imatrix.text, imatrix.file, imatrix.ctx, imatrix.chunks)
    covered = set(imatrix.quants) if imatrix else set()
    if missing := [t.label for t in made if t.needs_imatrix and t.label not in covered]:
        if not dry_run:
            raise NeedsImatrix(missing)
        notes.append(f"{', '.join(missing)} will need an importance matrix when made for real")
    return QuantPlan(model, outtype, made, imatrix, tuple(notes))
