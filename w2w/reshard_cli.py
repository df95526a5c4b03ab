"""w2w-reshard: rewrite a checkpoint with N shards; its arguments are checked before torch loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from w2w.errors import ConfigError
from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem
from w2w.shapes import PRECISION_BYTES


def check_destination(src: Path, dst: Path) -> None:
    """SRC must be a folder; DST a folder other than SRC (after `dir/`, `..` and symbolic links resolve)."""
    if not src.is_dir():
        raise ConfigError(f"SRC {src} is not a folder: give the directory of a checkpoint (params.json or "
                          "config.json beside its weights)")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"DST {dst} is a file, not a folder: give a directory to write the checkpoint into")
    problem = writable_problem(dst)
    if problem:
        raise ConfigError(f"DST {dst}: {problem}: give a directory you can write")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"DST {dst} is SRC {src}: write the resharded checkpoint to a new directory "
                          "(nothing was changed)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="w2w-reshard",
        description="Write a checkpoint (Meta's params.json + consolidated.NN.pth, or Hugging Face "
        "config.json + *.safetensors) as a Meta checkpoint with N shards. Holds one output shard in memory.",
    )
    parser.add_argument("src", type=Path, help="checkpoint directory to read")
    parser.add_argument("dst", type=Path, help="directory to write (created)")
    parser.add_argument("--shards", type=int, required=True, help="number of output shards (= GPUs)")
    # PRECISION_BYTES names the precisions without torch (pinned to model.DTYPES by a test).
    parser.add_argument("--dtype", choices=[*PRECISION_BYTES, "keep"], default="keep", help="weight dtype to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in DST")
    return parser


def _reshard(opts: argparse.Namespace) -> list[Path]:
    """Clear what --force allows in DST, then reshard (torch is imported here, after the argument checks)."""
    from w2w.checkpoint import PARAMS_JSON, reshard, stale_shards
    from w2w.model import DTYPES

    if (opts.dst / PARAMS_JSON).exists() and not opts.force:
        raise ConfigError(f"{opts.dst / PARAMS_JSON} exists: pass --force to overwrite")
    stale = stale_shards(opts.dst, opts.shards)
    if stale and not opts.force:
        raise ConfigError(f"{opts.dst} holds {stale[0].name}, beyond --shards={opts.shards}: pass --force")
    for path in stale:
        path.unlink()
    if (opts.dst / PARAMS_JSON).exists():
        (opts.dst / PARAMS_JSON).unlink()
    return reshard(opts.src, opts.dst, opts.shards, None if opts.dtype == "keep" else DTYPES[opts.dtype])


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    try:
        if opts.shards < 1:
            raise ConfigError(f"--shards={opts.shards}: must be >= 1")
        check_destination(opts.src, opts.dst)  # before anything in DST is removed
        written = _reshard(opts)
    except ConfigError as exc:
        print(f"w2w-reshard: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # DST refused a write the checks could not foresee (permissions as seen by a server, a full disk)
        print(f"w2w-reshard: error: writing {opts.dst} failed: {exc.strerror or exc} ({exc.filename or opts.dst}): "
              "give a directory you can write, with room for the checkpoint", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} shard(s), {size / 2**30:.2f} GiB, to {opts.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
