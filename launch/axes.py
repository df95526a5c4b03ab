"""The axes of a sweep: the cell parameters whose values differ across its cells, found generically."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from w2w.cell import PLACEMENT_KEYS, SHOWN_AXES, Cell

# Not parameters of a cell's result: where it is written, and the grid that made it.
NOT_PARAMETERS = ("sweep_dir", "grid")
# Config groups: a key inside one that only follows the group's choice is shown as the choice.
GROUPS = ("model", "gpu", "dataset", "cluster")
# Shown for every cell, whether they vary or not (the placement's are on its job's line).
CELL_AXES = tuple(axis.key for axis in SHOWN_AXES if not axis.placement)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"dataset": {"num_prompts": 4}} -> {"dataset.num_prompts": 4}; lists become their JSON-like text."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return flat


def cell_parameters(cell: Cell | Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf of a cell's settings (or of a record's `config`), dotted, without the result-neutral
    folder and grid."""
    data = cell.to_dict() if isinstance(cell, Cell) else dict(cell)
    for key in NOT_PARAMETERS:
        data.pop(key, None)
    return flatten(data)


def _group(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in GROUPS and "." in key else None


def varying_axes(cells: Iterable[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose values differ across the cells, in config order. A key of a config
    group (model.dim) that only follows the group's name (model.name) is left out: the name says it."""
    cells = list(cells)
    keys: dict[str, None] = {}
    for cell in cells:
        keys |= dict.fromkeys(cell)
    axes = []
    for key in keys:
        values = {_hashable(cell.get(key)) for cell in cells}
        if len(values) < 2:
            continue
        group = _group(key)
        if group and not key.endswith(".name") and _follows(cells, key, f"{group}.name"):
            continue
        axes.append(key)
    return axes


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _follows(cells: list[Mapping[str, Any]], key: str, name_key: str) -> bool:
    """True when each value of name_key comes with one value of key."""
    seen: dict[Any, Any] = {}
    for cell in cells:
        name, value = _hashable(cell.get(name_key)), _hashable(cell.get(key))
        if seen.setdefault(name, value) != value:
            return False
    return True


def label(key: str) -> str:
    """The column name of an axis: a group's choice by the group's name (model.name -> model)."""
    return key.removesuffix(".name") if _group(key) and key.endswith(".name") else key


def cell_axes(cells: Iterable[Mapping[str, Any]]) -> list[str]:
    """The columns of a cell's line under its job: the usual ones, then every other axis that varies
    (the placement's keys are in the job's own line)."""
    extra = [a for a in varying_axes(cells) if a not in CELL_AXES and a.split(".")[0] not in PLACEMENT_KEYS]
    return [*CELL_AXES, *extra]


def describe(params: Mapping[str, Any], axes: Iterable[str], skip_none: bool = False) -> str:
    """'batch_size=2 seed=1' for the axes of one cell."""
    return " ".join(f"{label(k)}={params.get(k)}" for k in axes if not (skip_none and params.get(k) is None))
