"""The generic engine between JSON and Schema dataclasses: typed reads, lossless writes and batch totals."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, ClassVar, TypeVar

UPGRADE_HINT = "upgrade w2w (pip install -U w2w, or git pull in its checkout) to read it"

S = TypeVar("S", bound="Schema")

# How total() combines a field over a cell's batches (its `metadata["total"]`); fields without one are not summed.
ADD = "add"  # the sum; None where any batch has no figure (or there is no batch): never a partial sum
MIN = "min"  # the smallest (None: no batch)
MAX = "max"  # the largest (None: no batch)
LATER = "later"  # a figure added after files were written: the sum, None where any batch lacks it (never 0);
# left out of the JSON while None
CELL = "cell"  # the whole cell's, set once by the cell: never summed from its batches


def rule(how: str, default: Any = None) -> Any:
    """A dataclass field that total() combines as `how` says."""
    return field(default=default, metadata={"total": how})


class RecordError(ValueError):
    """A record file that does not parse or lacks required fields."""


class NewerSchemaError(RecordError):
    """A record or manifest written by a newer w2w than this one."""


def check_version(found: Any, newest: int, what: str, key: str = "schema") -> None:
    """Refuse what a newer w2w wrote: its fields may mean something this version does not know."""
    if isinstance(found, bool) or not isinstance(found, int):
        raise RecordError(f"{what}: {key} {found!r} is not a version number")
    if found > newest:
        raise NewerSchemaError(
            f"{what}: written by a newer w2w ({key} {found}; this w2w reads up to {newest}): {UPGRADE_HINT}"
        )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` from JSON as `hint` says (a Schema becomes its dataclass), or RecordError naming the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:  # X | None: the error is X's, down to the nested field
            return _convert(value, options[0], where)
        for option in options:
            try:
                return _convert(value, option, where)
            except RecordError:
                continue
        raise RecordError(f"field '{where}' is {value!r}, not {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif isinstance(hint, type) and issubclass(hint, Schema):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return hint.from_dict(value, where)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            args = typing.get_args(hint)
            return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, list | tuple):
            args = typing.get_args(hint)
            return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value  # an int stays one (as PEP 484 lets a float hint hold): rewritten, the file is the same
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RecordError(f"field '{where}' is {value!r}, not {_type_name(hint)}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A Schema dataclass's JSON fields and their types (`extra` holds the rest)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}


def _plain(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Schema:
    """A dataclass with a JSON form: known keys typed, unknown keys kept in `extra`, nothing lost.

    Adding a field is one line in its dataclass (with a default, so older files still read).
    """

    # Fields left out of the JSON while None (sections a failed cell never had).
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any], where: str = "") -> S:
        types_ = _field_types(cls)
        known, extra = {}, {}
        for key, value in data.items():
            if key in types_:
                known[key] = _convert(value, types_[key], f"{where}.{key}" if where else key)
            else:
                extra[key] = value
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in known and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecordError(f"missing field '{(where + '.') if where else ''}{missing[0]}'")
        return cls(**known, extra=extra)

    def merged(self: S, values: dict[str, Any]) -> S:
        """A copy with `values` set (plain JSON or sections), checked as when read from a file."""
        return type(self).from_dict(self.to_dict() | _plain(values))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and (f.name in self.OMIT_IF_NONE or f.metadata.get("total") == LATER):
                continue  # a LATER field is absent from files written before it: they read and write back the same
            out[f.name] = _plain(value)
        return out | _plain(self.extra)


def _combine(how: str, values: list[Any], integer: bool) -> Any:
    if how in (MIN, MAX):
        known = [v for v in values if v is not None]
        return (min if how == MIN else max)(known, default=None)
    if not values or any(v is None for v in values):
        return None
    return int(sum(values)) if integer else float(math.fsum(values))


def total(sections: Sequence[Schema], cls: type[Schema]) -> dict[str, Any]:
    """Every field of `cls` that carries a rule (ADD, MIN, MAX, LATER), combined over `sections`
    (one per batch) as its rule says; an ADD count of no batch is its default (0)."""
    out = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        how = f.metadata.get("total")
        if how is None or how == CELL:
            continue
        hint = _field_types(cls)[f.name]
        integer = hint is int or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                                  and int in typing.get_args(hint))
        values = [getattr(s, f.name) for s in sections]
        if how == ADD and not values and f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = _combine(how, values, integer)
    return out


