"""w2w-generate: load the configured checkpoint at its shard count and print one prompt's completion."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from w2w.cell import Cell
from w2w.config import compose_cell, expand_overrides
from w2w.errors import ConfigError
from w2w.exits import quiet_on_broken_pipe

log = logging.getLogger("w2w.generate")

USAGE = """usage: w2w-generate [key=value ...] prompt="TEXT"

Hydra overrides as for w2w-run (model=, model.checkpoint_dir=, shards=, precision=, gpu=,
max_gen_len=, greedy=true, temperature=, top_p=, seed=). With shards=N > 1 start one
process per shard: torchrun --nproc-per-node N -m w2w.generate_cli ... prompt="TEXT".
The completion goes to stdout (rank 0); load time and speed go to the log (stderr)."""


def split_prompt(argv: list[str]) -> tuple[str | None, list[str]]:
    """`prompt=...` is not a config key and may hold commas or '=': take it out before Hydra parses."""
    prompt, rest = None, []
    for arg in argv:
        if arg.startswith("prompt="):
            prompt = arg.removeprefix("prompt=")
        else:
            rest.append(arg)
    return prompt, rest


def compose(overrides: list[str]) -> Cell:
    points = expand_overrides(overrides)
    if len(points) != 1:
        raise ConfigError("w2w-generate runs one configuration: drop the comma lists (a,b) from the overrides")
    return compose_cell(points[0])


def length_problem(prompt_tokens: int, max_gen_len: int, max_seq_len: int) -> str | None:
    """Why prompt + max_gen_len does not fit the model's context, and what can fix it; None if it fits."""
    if prompt_tokens + max_gen_len <= max_seq_len:
        return None
    head = (f"prompt of {prompt_tokens} tokens + max_gen_len={max_gen_len} exceeds "
            f"model.max_seq_len={max_seq_len}")
    if prompt_tokens >= max_seq_len:
        # No max_gen_len can help: the prompt alone fills the context.
        return (f"{head}: the prompt alone fills the context: shorten the prompt to under {max_seq_len} "
                f"tokens, or raise model.max_seq_len if the model was trained for a longer context")
    return (f"{head}: lower max_gen_len to at most {max_seq_len - prompt_tokens}, shorten the prompt, "
            f"or raise model.max_seq_len if the model was trained for a longer context")


def complete(cfg: Cell, prompt: str) -> tuple[str, int]:
    """Run on every rank; returns (completion text, rank)."""
    # Imported here: a bad argument is refused before torch, FairScale and the runner load (seconds).
    from w2w import distributed, engines
    from w2w.engines.common import SamplingParams
    from w2w.runner import load_model

    info = distributed.init(cfg.gpu.device, cfg.dist_timeout_s)
    with contextlib.redirect_stdout(sys.stderr):  # FairScale prints its set-up; stdout is the completion's
        distributed.init_model_parallel(cfg.shards, info.world_size)
    start = time.perf_counter()
    model, tokenizer = load_model(cfg, info)
    log.info("model %s loaded at %d shard(s) in %.2f s", cfg.model.name, cfg.shards, time.perf_counter() - start)
    ids = tokenizer.encode(prompt)
    problem = length_problem(len(ids), cfg.max_gen_len, model.args.max_seq_len)
    if problem:
        raise ConfigError(problem)
    engine = engines.create_serving([cfg.engine], model)[cfg.engine]
    start = time.perf_counter()
    gen = engine.generate([ids], SamplingParams.of(cfg), tokenizer.eos_id, tokenizer.pad_id)
    seconds = time.perf_counter() - start
    tokens = len(gen.tokens[0])
    log.info("%d prompt tokens, %d new tokens in %.2f s (%.1f tokens/s, %s)", len(ids), tokens, seconds,
             tokens / seconds if seconds else 0.0, "greedy" if cfg.greedy else f"T={cfg.temperature} top_p={cfg.top_p}")
    return tokenizer.decode(gen.tokens[0]), info.rank


def _shutdown() -> None:
    # Leaves the process clean for another main() call (tests) and avoids NCCL's exit warning.
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    prompt, overrides = split_prompt(args)
    if prompt is None:
        print(f"w2w-generate: error: no prompt given\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        cell = compose(overrides)
    except ConfigError as exc:
        print(f"w2w-generate: error: {exc}", file=sys.stderr)
        return 2
    from w2w.runner import setup_logging  # torch: only once the arguments are known to be good

    setup_logging()
    try:
        text, rank = complete(cell, prompt)
    except ConfigError as exc:
        print(f"w2w-generate: error: {exc}", file=sys.stderr)
        return 2
    finally:
        _shutdown()
    if rank == 0:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
