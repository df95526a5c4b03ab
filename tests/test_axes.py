"""The cell axes, defined once in w2w.cell.AXES: what each table derives from them, and the CLIs that
check their arguments before loading pandas."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from w2w.analysis import pareto, repeats
from w2w.analysis.page import ENGINE_SETTING
from w2w.analysis.reduce import PARAM_COLUMNS, table_columns
from w2w.launch.axes import CELL_AXES, cell_parameters

from tests.conftest import ROOT
from w2w.cell import AXES, SHOWN_AXES, Cell
from w2w.config import compose_cell


def test_a_records_params_are_the_axes_read_from_the_cell():
    cell = compose_cell(["gpu=a100", "batch_size=4", "power_cap_w=250", "dataset.num_prompts=8", "seed=3"])
    params, config = cell.params(), cell_parameters(cell)
    assert list(params) == [axis.column for axis in AXES]
    assert all(params[axis.column] == config[axis.key] for axis in AXES)
    assert (params["batch_size"], params["power_cap_w"], params["num_prompts"], params["seed"]) == (4, 250, 8, 3)


def test_every_list_of_axes_is_derived_from_the_shown_axes():
    shown = [axis.column for axis in SHOWN_AXES]
    assert shown == ["model", "gpu", "dataset", "shards", "precision", "engine", "batch_size", "max_gen_len",
                     "power_cap_w"]
    assert list(PARAM_COLUMNS) == shown and list(repeats.AXES) == shown and list(pareto.AXES) == shown
    assert list(ENGINE_SETTING) == [c for c in shown if c != "engine"]
    # Under its job's line (model, GPU, shards, precision), a cell shows the rest.
    assert CELL_AXES == ("dataset.name", "engine", "batch_size", "max_gen_len", "power_cap_w")
    assert set(pareto.SHORT) == set(shown)


def _cells(**columns) -> pd.DataFrame:
    base = {"cell_id": ["a", "b"], "model": ["tiny", "tiny"], "gpu": ["cpu", "cpu"], "dataset": ["synthetic"] * 2,
            "shards": [1, 1], "precision": ["fp32", "fp32"], "engine": ["fast", "fast"], "batch_size": [2, 2],
            "max_gen_len": [4, 4], "power_cap_w": [None, None], "status": ["ok", "ok"], "repeats": [1, 1]}
    return pd.DataFrame(base | columns)


def test_the_printed_cells_table_shows_precision_and_the_power_cap_where_they_vary():
    usual = ["model", "gpu", "dataset", "shards", "engine", "batch_size", "max_gen_len", "status"]
    assert table_columns(_cells())[:8] == usual
    assert table_columns(_cells(power_cap_w=[None, 250.0]))[:9] == [*usual[:7], "power_cap_w", "status"]
    assert table_columns(_cells(precision=["fp32", "bf16"]))[:9] == [*usual[:4], "precision", *usual[4:]]
    # An incomplete cell has no settings: it does not make an axis vary.
    incomplete = _cells(model=["tiny", None], precision=["fp32", None])
    assert table_columns(incomplete)[:8] == usual


def test_the_repeats_table_names_the_precision_where_it_varies():
    table = repeats.spread_table(_cells(precision=["fp32", "bf16"]))
    assert list(table["precision"]) == ["fp32", "bf16"]


def test_sampling_defaults_are_the_cells_and_the_config_files():
    """conf/config.yaml and engines.common.SamplingParams restate Cell's defaults: pinned here.
    SamplingParams.eos_check_every is 1 on purpose: a caller without a cell (gpu_check, the benchmarks)
    checks for the end after every step; a cell's runs take the cell's (SamplingParams.of)."""
    pytest.importorskip("torch")
    from w2w.engines.common import SamplingParams

    cell = {f.name: f.default for f in dataclasses.fields(Cell) if f.default is not dataclasses.MISSING}
    params = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    shared = ("temperature", "top_p", "greedy", "force_max_gen_len", "seed")
    assert {k: params[k] for k in shared} == {k: cell[k] for k in shared}
    assert params["eos_check_every"] == 1
    config = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())
    scalars = {k: v for k, v in config.items() if not isinstance(v, (dict, list))}
    assert scalars and scalars == {k: cell[k] for k in scalars}


# --help and a wrong folder are answered before pandas, pyarrow or matplotlib load.
HEAVY = ("pandas", "pyarrow", "matplotlib")


@pytest.mark.parametrize("module", ["w2w.analysis.reduce", "w2w.analysis.report"])
@pytest.mark.parametrize("args", [["--help"], ["no-such-sweep"]])
def test_reduce_and_report_check_their_arguments_before_loading_pandas(module, args, tmp_path):
    code = (f"import sys; from {module} import main\ntry:\n    code = main({args!r})\n"
            "except SystemExit as exc:\n    code = exc.code\n"
            f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("W2W_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.stdout.splitlines()[-1] == f"{0 if args == ['--help'] else 2} []", result.stdout + result.stderr
    if args != ["--help"]:
        assert "has no cells/ folder" in result.stderr
