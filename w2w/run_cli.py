"""w2w-run's command line: the grid, its files and sweep_dir checked before torch loads, then the runner."""

from __future__ import annotations

import sys
from pathlib import Path

from w2w import signals
from w2w.cell import Cell
from w2w.config import compose_grid, one_placement, split_config_dirs
from w2w.data import check_dataset
from w2w.errors import ConfigError
from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem

USAGE = ("usage: w2w-run [--config-dir DIR] [key=value ...]  (Hydra overrides; a,b lists make a grid; DIR: more "
         "presets, also W2W_CONFIG_DIR)")


def check_cells(cells: list[Cell]) -> None:
    """What would fail once torch and the model are loaded: each sweep_dir and dataset checked once."""
    for sweep_dir in dict.fromkeys(c.sweep_dir for c in cells):
        problem = writable_problem(Path(sweep_dir))
        if problem:
            raise ConfigError(f"sweep_dir={sweep_dir}: {problem}: give sweep_dir= a folder you can write")
    for dataset in dict.fromkeys(c.dataset for c in cells):
        check_dataset(dataset)


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    # SIGTERM (scancel, timeout, kill) and SIGINT (Ctrl-C) stop it in one line, after the batch that runs.
    with signals.on_signals():
        try:
            return _main(args)
        except signals.Stopped as stop:
            print(signals.stopped_line("w2w-run", stop), file=sys.stderr)
            return stop.exit_status


def _main(args: list[str]) -> int:
    try:
        config_dirs, overrides = split_config_dirs(args)
        cells = compose_grid(overrides, config_dirs)
        one_placement(cells)
        check_cells(cells)
    except ConfigError as exc:
        print(f"w2w-run: error: {exc}", file=sys.stderr)
        return 2
    # torch, FairScale, the model: only for arguments known to be good; the cells are composed once, here
    from w2w.runner import run_main

    return run_main(cells)


if __name__ == "__main__":
    sys.exit(main())
