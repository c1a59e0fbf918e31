"""Recipes: one YAML file per model, validated by pydantic models as it loads.

An unknown key is refused and every error names the file and the key, so a typo fails at once instead of
silently using a default, and a bad size, placement or quant name fails now instead of when its stage runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from moeprep import names, placement, quants
from moeprep.errors import MoeprepError
from moeprep.ggufio.probe import MAX_EXPERTS
from moeprep.hub import errors as hub_ids
from moeprep.inputs import KIB, check_file, load_yaml, read_text, short
from moeprep.limits import MAX_CHUNKS, MAX_CTX, MAX_RUNS, MAX_TEMPLATE, MAX_TOKENS
from moeprep.placement import MAX_BLOCKS
from moeprep.quants import MIXES, ImatrixSpec, QuantPlan, check_types, get, parse
from moeprep.stages.card import CardOptions
from moeprep.units import parse_size

FIX = "fix the recipe"
MAX_BYTES = 256 * KIB  # a recipe is a screenful of YAML


class _Invalid(ValueError):
    """A MoeprepError raised in a validator, since pydantic locates only ValueErrors; `key` overrides the location."""
    def __init__(self, message: str, hint: str | None = FIX, key: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.key = message, hint, key


def _checked(check):  # moeprep's own check as a pydantic validator
    def run(value):
        try:
            return check(value)
        except MoeprepError as e:
            raise _Invalid(e.message, e.hint) from None
    return run


def _size(value):
    parse_size(value)  # refuses 1.2.3GB, 0 and a bare 50; the text is kept as written, for plans and cards
    return value


def _quants(names: list[str]) -> list[str]:
    return check_types(names, allow_imatrix=True)


def _mixes(names: list[str]) -> list[str]:
    return list(dict.fromkeys(get(n).name for n in names))


def _quants_or_mixes(names: list[str]) -> list[str]:
    return [_mixes([n])[0] if n.lower() in MIXES else _quants([n])[0] for n in names]


def _rules(texts: list[str]) -> list[str]:
    return [str(parse(t)) for t in texts]


def _one_or_many(value):  # `mix: moe-q4` reads as `mix: [moe-q4]`
    return [value] if isinstance(value, str) else value


ModelName = Annotated[str, AfterValidator(_checked(lambda text: names.model_name(text, "the recipe")))]
RepoId = Annotated[str, AfterValidator(_checked(hub_ids.check_repo_id))]
Size = Annotated[str, BeforeValidator(_checked(_size))]
Quants = Annotated[list[str], AfterValidator(_checked(_quants))]
Mixes = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(_checked(_mixes))]
QuantsOrMixes = Annotated[list[str], AfterValidator(_checked(_quants_or_mixes))]
TensorTypes = Annotated[list[str], AfterValidator(_checked(_rules))]
PlacementName = Annotated[str, AfterValidator(_checked(lambda text: placement.parse(text).name))]


class Section(BaseModel):
    # strict: YAML's `yes` or "3" is not quietly read as true or 3; forbid: a misspelt key is an error
    model_config = ConfigDict(extra="forbid", strict=True)


class Source(Section):
    repo: RepoId
    revision: str = "main"
    # The weights' total as the Hub lists it, e.g. "93.4GB": what `moeprep matrix` sizes each job's disk and time
    # from, without asking the Hub. The download stage says so when the real total differs by more than 5 %.
    size: Size | None = None

    @property
    def size_bytes(self) -> int | None:
        return parse_size(self.size) if self.size else None


class Imatrix(Section):
    calibration: str  # a text file, relative to the recipe
    quants: QuantsOrMixes  # the quants and mixes made with it
    ctx: int = Field(512, ge=32, le=MAX_CTX)  # the same bounds as `moeprep imatrix`
    chunks: int = Field(0, ge=0, le=MAX_CHUNKS)  # 0: the whole text


class Smoke(Section):
    placements: list[PlacementName] = Field(["gpu", "cpu-moe"], max_length=64)
    ctx: int = Field(4096, ge=64, le=MAX_CTX)  # the same bounds as `moeprep smoke`
    runs: int = Field(3, ge=1, le=MAX_RUNS)
    tokens: int = Field(64, ge=2, le=MAX_TOKENS)  # decode speed needs two tokens: it is timed from the first
    # KL divergence chunks of the evaluation text (0: all of it). A release measures quality on the prepare
    # runner's CPU, once per file: fewer chunks bound that time for an 80 GB model.
    quality_chunks: int = Field(0, ge=0, le=MAX_CHUNKS)
    sweep: bool = False  # the offload curve (moeprep smoke --sweep) instead of `placements`


def _branch(name: str) -> str:
    if name == "main" or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name.endswith(".lock"):
        raise MoeprepError(f"{short(name)} cannot be the staging branch", "name a branch other than main: letters, digits, . _ -")
    return name


Branch = Annotated[str, AfterValidator(_checked(_branch))]


class Hub(Section):
    repo_id: RepoId
    layout: Literal["single", "per-quant"] = "single"
    max_shard: Size = "50GB"
    private: bool = False
    # The branch of repo_id where scheduled jobs meet: prepare pushes the GGUFs there, each smoke job adds its
    # result, publish promotes it to main in one commit (see staging.py).
    staging: Branch = "moeprep-staging"

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard)


class Card(Section):
    quantized_by: str = "moeprep"
    base_model: str | None = None
    template: str | None = None


class Expect(Section):
    architecture: str | None = Field(None, max_length=200)  # config.json's architectures[0]
    expert_count: int | None = Field(None, ge=1, le=MAX_EXPERTS)
    expert_used_count: int | None = Field(None, ge=1, le=MAX_EXPERTS)
    expert_shared_count: int | None = Field(None, ge=0, le=MAX_EXPERTS)
    block_count: int | None = Field(None, ge=1, le=MAX_BLOCKS)


class Recipe(Section):
    name: ModelName  # the release's files are named after it, in releases/<name>
    source: Source
    hub: Hub
    quants: Quants = Field(["Q8_0", "Q4_K_M", "Q2_K"], max_length=64)
    mix: Mixes = Field([], max_length=16)  # named mixes made besides the quants: <name>-<mix>.gguf
    tensor_types: TensorTypes = Field([], max_length=64)  # PATTERN=TYPE rules for every quant and mix, first match wins
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    imatrix: Imatrix | None = None
    smoke: Smoke = Field(default_factory=Smoke)
    card: Card = Field(default_factory=Card)
    expect: Expect = Field(default_factory=Expect)
    _path: Path | None = PrivateAttr(None)  # where it was read from; private, so `path:` in YAML is unknown
    _plan: QuantPlan | None = PrivateAttr(None)

    @property
    def path(self) -> Path | None:
        return self._path

    def relative(self, name: str) -> Path:
        return (self.path.parent if self.path else Path(".")) / name

    @property
    def quant_plan(self) -> QuantPlan:
        """What the release makes, decided by quants.plan as every other run decides it (checked as the recipe
        loads)."""
        assert self._plan is not None
        return self._plan

    def card_options(self) -> CardOptions:
        return CardOptions(repo_id=self.hub.repo_id, layout=self.hub.layout, quantized_by=self.card.quantized_by,
                           base_model=self.card.base_model,
                           template=self.relative(self.card.template) if self.card.template else None)

    @model_validator(mode="after")
    def _check_plan(self, info: ValidationInfo) -> Recipe:
        self._path = (info.context or {}).get("path")  # set first: the calibration text is relative to it
        if self.card.template:
            try:
                check_file(self.relative(self.card.template), MAX_TEMPLATE, "card template",
                           "give a Jinja template file relative to the recipe")
            except MoeprepError as e:
                raise _Invalid(e.message, e.hint, key="card.template") from None
        spec = None
        if self.imatrix:
            if not (text := self.relative(self.imatrix.calibration)).is_file():
                raise _Invalid(f"{text} not found", "give a text file relative to the recipe", key="imatrix.calibration")
            spec = ImatrixSpec(tuple(self.imatrix.quants), text, ctx=self.imatrix.ctx, chunks=self.imatrix.chunks)
        try:
            self._plan = quants.plan(self.name, self.quants, self.mix, self.tensor_types, outtype=self.outtype,
                                     imatrix=spec)
        except quants.NeedsImatrix as e:
            raise _Invalid(f"{', '.join(e.labels)} need an importance matrix",
                           "add an imatrix section that lists them, or choose other quants",
                           key="quants" if e.labels[0] in self.quants else "mix") from None
        except quants.NotMade as e:
            raise _Invalid(f"names {', '.join(e.labels)}, which quants does not list",
                           "list every imatrix quant under quants too", key="imatrix.quants") from None
        except MoeprepError as e:
            raise _Invalid(e.message, e.hint, key="tensor_types") from None
        return self


def load(path: Path) -> Recipe:
    path = Path(path)
    if path.is_dir():
        example = next(iter(sorted(path.glob("*.yaml"))), path / "x.yaml")  # a real one where there is one
        raise MoeprepError(f"{path} is a directory", f"give one recipe file, e.g. {example}")
    text = read_text(path, MAX_BYTES, "recipe", "give the path of a recipes/*.yaml file")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise MoeprepError(f"{path} is not valid YAML ({str(e).splitlines()[0][:120]})", FIX) from None
    if not isinstance(data, dict):
        raise MoeprepError(f"{path} holds {'nothing' if data is None else f'a {type(data).__name__}'}, not recipe keys",
                           "start from one of recipes/*.yaml")
    try:
        return Recipe.model_validate(data, context={"path": path})
    except ValidationError as e:
        raise _error(path, e) from e


def _error(path: Path, e: ValidationError) -> MoeprepError:
    """The first problem pydantic found, as `FILE: KEY ...`; the rest show once it is fixed."""
    first = e.errors()[0]
    kind, loc, value, ctx = first["type"], first["loc"], first["input"], first.get("ctx", {})
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if isinstance(ctx.get("error"), _Invalid):
        return MoeprepError(f"{path}: {ctx['error'].key or key}: {ctx['error'].message}", ctx["error"].hint)
    where = f"{path}: {loc[0]}: " if len(loc) > 1 else f"{path}: "  # sections are one level deep
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: YAML read `1:` or `yes:` as a number or bool
        section = Recipe.model_fields[str(loc[0])].annotation if len(loc) > 1 else Recipe
        known = next(k for k in get_args(section) or [section] if k is not type(None)).model_fields  # type: ignore[union-attr]
        return MoeprepError(f"{where}unknown key {short(loc[-1])}", f"known keys: {', '.join(sorted(known))}")
    if kind == "missing":
        return MoeprepError(f"{where}missing key {loc[-1]!r}", "add it to the recipe")
    got = "nothing" if value is None else f"{type(value).__name__} {short(value)}"  # `hub:` with no value is None
    must = {"int_type": f"an integer, not {got}", "bool_type": f"true or false, not {got}",  # in a recipe's words
            "string_type": f"a string, not {got}", "list_type": f"a list, not {got}",
            "model_type": f"a mapping, not {got}",
            "greater_than_equal": f"at least {ctx.get('ge')} (got {short(value)})",
            "less_than_equal": f"at most {ctx.get('le')} (got {short(value)})",
            "literal_error": f"{ctx.get('expected')}, not {short(value)}"}
    if kind in must:
        return MoeprepError(f"{path}: {key} must be {must[kind]}", FIX)
    return MoeprepError(f"{path}: {key}: {first['msg'][:120]} (got {short(value)})", FIX)


def discover(folder: Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    found = sorted(folder.glob("*.yaml"))
    if not found:
        raise MoeprepError(f"no recipes (*.yaml) in {folder}", "give the recipes/ folder or a recipe file")
    return found
