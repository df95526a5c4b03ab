"""w2w-report: the paper's tables, figures and a comparison with its published numbers, from a finished sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem
from w2w.manifest import MANIFEST, ManifestError
from w2w.schema import RecordError

# Every name past the argument checks comes from w2w.analysis.page, imported there: it loads pandas,
# matplotlib and pyarrow, which --help and a wrong folder need not wait for.


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a finished sweep directory (holds cells/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP/results/paper)")
    parser.add_argument("--max-timelines", type=int, default=None, help="draw at most this many cell timelines")
    parser.add_argument("--min-tokens-per-s", type=float, default=None, metavar="X",
                        help="name the cheapest configuration (energy per token) with at least X tokens/s")
    parser.add_argument("--max-seconds-per-response", type=float, default=None, metavar="Y",
                        help="... and at most Y seconds per response (the wait for its batch)")
    args = parser.parse_args(argv)
    for option, value in (("--min-tokens-per-s", args.min_tokens_per_s),
                          ("--max-seconds-per-response", args.max_seconds_per_response)):
        if value is not None and not value > 0:
            print(f"w2w-report: error: {option}={value}: must be > 0", file=sys.stderr)
            return 2
    if not (args.sweep_dir / "cells").is_dir() and not (args.sweep_dir / MANIFEST).is_file():
        # A planned sweep whose jobs wrote no cell yet has its manifest: that one is a run, without results.
        print(f"w2w-report: error: {args.sweep_dir} has no cells/ folder: give the sweep_dir of a run",
              file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "results" / "paper"
    problem = writable_problem(out)
    if problem:
        print(f"w2w-report: error: cannot write the report to {out}: {problem}: give --out a folder you can write",
              file=sys.stderr)
        return 2
    from w2w.analysis.page import NoOkCellError, render
    from w2w.analysis.pareto import Target

    target = Target(args.min_tokens_per_s, args.max_seconds_per_response)
    try:
        report = render(args.sweep_dir, out, args.max_timelines, target)
    except (ManifestError, RecordError) as exc:
        print(f"w2w-report: error: {exc}", file=sys.stderr)
        return 2
    except NoOkCellError as exc:
        print(f"w2w-report: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read-only sweep_dir or --out, a file where a folder must go
        print(f"w2w-report: error: cannot write the report to {out}: {exc.strerror or exc} "
              f"({exc.filename or out}): give --out a folder you can write", file=sys.stderr)
        return 2
    if report.incomplete:
        print(f"w2w-report: warning: {report.incomplete}", file=sys.stderr)
    for note in report.notes:
        print(note)
    print("\n".join(report.recommendation))
    print(f"{len(report.files)} files under {out}/; start with {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
