"""Recipes: one YAML file per model, validated strictly into typed records.

An unknown key or a value of the wrong type is an error that names the file and the key, so a typo
in a scheduled release fails at once instead of silently using a default.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import MoeprepError


@dataclass
class Source:
    repo: str
    revision: str = "main"


@dataclass
class Imatrix:
    calibration: str  # a text file, relative to the recipe
    quants: list[str]  # the quants made with it
    ctx: int = 512
    chunks: int = 0  # 0: the whole text


@dataclass
class Smoke:
    placements: list[str] = field(default_factory=lambda: ["gpu", "cpu-moe"])
    ctx: int = 4096
    runs: int = 3
    tokens: int = 64


@dataclass
class Hub:
    repo_id: str
    layout: str = "single"
    max_shard: str = "50GB"
    private: bool = False


@dataclass
class Card:
    quantized_by: str = "moeprep"
    base_model: str | None = None
    template: str | None = None


@dataclass
class Expect:
    architecture: str | None = None  # config.json's architectures[0]
    expert_count: int | None = None
    expert_used_count: int | None = None
    expert_shared_count: int | None = None
    block_count: int | None = None


@dataclass
class Recipe:
    name: str
    source: Source
    hub: Hub
    quants: list[str] = field(default_factory=lambda: ["Q8_0", "Q4_K_M", "Q2_K"])
    outtype: str = "f16"
    imatrix: Imatrix | None = None
    smoke: Smoke = field(default_factory=Smoke)
    card: Card = field(default_factory=Card)
    expect: Expect = field(default_factory=Expect)
    path: Path | None = None  # where it was read from; not a key

    def relative(self, name: str) -> Path:
        return (self.path.parent if self.path else Path(".")) / name


def _check(value, kind, where: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
        origin = typing.get_origin(kind)
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise _wrong(where, "a list", value)
        return [_check(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        return _build(kind, value, where)
    if kind is bool and not isinstance(value, bool):
        raise _wrong(where, "true or false", value)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise _wrong(where, "an integer", value)
    if kind is str and not isinstance(value, str):
        raise _wrong(where, "a string", value)
    return value


def _wrong(where: str, wanted: str, value) -> MoeprepError:
    return MoeprepError(f"{where} must be {wanted}, not {type(value).__name__} {value!r}", "fix the recipe")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise _wrong(where, "a mapping", data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.name != "path"}
    for key in data:
        if key not in known:
            raise MoeprepError(f"{where}: unknown key {key!r}", f"known keys: {', '.join(sorted(known))}")
    values = {}
    for f in fields(cls):
        if f.name == "path":
            continue
        if f.name in data:
            values[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise MoeprepError(f"{where}: missing key {f.name!r}", "add it to the recipe")
    return cls(**values)


def load(path: Path) -> Recipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoeprepError(f"recipe {path} not found", "give the path of a recipes/*.yaml file") from None
    except yaml.YAMLError as e:
        raise MoeprepError(f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the recipe") from e
    recipe = _build(Recipe, data, str(path))
    recipe.path = path
    return _validate(recipe)


def _validate(r: Recipe) -> Recipe:
    from .quantize import NEEDS_IMATRIX, check_types
    from .smoke import parse_placement

    where = str(r.path)
    try:
        r.quants = check_types(r.quants, allow_imatrix=True)
        for p in r.smoke.placements:
            parse_placement(p)
    except MoeprepError as e:
        raise MoeprepError(f"{where}: {e.message}", e.hint) from None
    if r.outtype not in ("f16", "bf16", "f32"):
        raise MoeprepError(f"{where}.outtype must be f16, bf16 or f32, not {r.outtype!r}", "fix the recipe")
    if r.hub.layout not in ("single", "per-quant"):
        raise MoeprepError(f"{where}.hub.layout must be single or per-quant", "fix the recipe")
    needing = [q for q in r.quants if q in NEEDS_IMATRIX]
    covered = set(r.imatrix.quants) if r.imatrix else set()
    if missing := [q for q in needing if q not in covered]:
        raise MoeprepError(f"{where}: {', '.join(missing)} need an importance matrix",
                           "add an imatrix section that lists them, or choose other quants")
    if r.imatrix:
        if stray := [q for q in r.imatrix.quants if q not in r.quants]:
            raise MoeprepError(f"{where}.imatrix.quants names {', '.join(stray)}, which quants does not list",
                               "list every imatrix quant under quants too")
        if not r.relative(r.imatrix.calibration).is_file():
            raise MoeprepError(f"{where}.imatrix.calibration: {r.relative(r.imatrix.calibration)} not found",
                               "give a text file relative to the recipe")
    return r


def discover(folder: Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    found = sorted(folder.glob("*.yaml"))
    if not found:
        raise MoeprepError(f"no recipes (*.yaml) in {folder}", "give the recipes/ folder or a recipe file")
    return found
