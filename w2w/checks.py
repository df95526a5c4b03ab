"""Plan-time checks that read files: prompt files, checkpoint shapes and tokenizers, before any job is submitted."""

from __future__ import annotations

from dataclasses import dataclass, field

from w2w.cell import Cell, DatasetConfig, ModelConfig
from w2w.data import check_dataset, plan_prompt_rows
from w2w.engines import prompt_room
from w2w.errors import ConfigError
from w2w.shapes import ModelArgs
from w2w.tokenizer import TINY_TOKENIZER, TokenizerLike, open_tokenizer


def model_shapes(model: ModelConfig) -> ModelArgs:
    """The model's real shapes: a checkpoint's (checked against its preset) or the preset's."""
    if not model.checkpoint_dir:
        return model.shapes()
    # Imported here: reading shard headers needs torch, planning without a checkpoint does not.
    from w2w.checkpoint import model_args

    return model_args(model)


def check_tokenizer(model: ModelConfig, args: ModelArgs) -> None:
    """A checkpoint's (or a named) tokenizer must match its embedding: known here, not after the load.
    Random weights without a tokenizer_path use the bundled tiny tokenizer, as the runner does."""
    if model.checkpoint_dir or model.tokenizer_path:
        # Imported here: planning without a checkpoint or tokenizer file needs no torch.
        from w2w.checkpoint import tokenizer_path
        from w2w.tokenizer import check_vocab, piece_count

        path = tokenizer_path(model)
        check_vocab(path, piece_count(path), model.name, args.vocab_size)


def runner_tokenizer(model: ModelConfig) -> TokenizerLike:
    """The tokenizer the runner opens for `model` (random weights without one: the bundled tiny one)."""
    if not model.checkpoint_dir and not model.tokenizer_path:
        return open_tokenizer(TINY_TOKENIZER, model.eos_token)
    from w2w.checkpoint import tokenizer_path  # needs torch: only where there is a file to find

    return open_tokenizer(tokenizer_path(model), model.eos_token)


def prompt_lengths(dataset: DatasetConfig, model: ModelConfig) -> list[tuple[int, int]] | None:
    """(row id, tokens) of each prompt the cell runs, encoded as the runner encodes it (BOS first);
    None for a hub dataset, which the login node does not load (the node checks it)."""
    rows = plan_prompt_rows(dataset)
    if rows is None:
        return None
    tokenizer = runner_tokenizer(model)
    return [(row.id, len(tokenizer.encode(row.text))) for row in rows]


def check_prompt_fits(cell: Cell, args: ModelArgs, lengths: list[tuple[int, int]]) -> int:
    """The longest prompt kept whole; ConfigError naming the longest row (counted from 1, as the data
    layer's messages count lines and rows) and the ways out."""
    fits = prompt_room(cell.engine, args.max_seq_len, cell.max_gen_len)
    row, longest = max(lengths, key=lambda rl: rl[1], default=(None, 0))
    if longest > fits:
        shorter = args.max_seq_len - longest
        lower = f"lower max_gen_len to {shorter} or less, " if shorter >= 1 else ""
        raise ConfigError(
            f"dataset={cell.dataset.name} row {row + 1}: its prompt is {longest} tokens but model.max_seq_len="
            f"{args.max_seq_len} - max_gen_len={cell.max_gen_len} leaves {fits} (engine={cell.engine}): {lower}raise model.max_seq_len to "
            f"{longest + cell.max_gen_len} or more, or set dataset.max_prompt_tokens=N to cut prompts (BOS and the "
            "last N-1 tokens are kept)"
        )
    return longest


# A hub dataset's prompts are not read on the login node (no datasets library there): the memory
# estimate assumes they fit in the allowance it always made, and the node checks each prompt's fit.
UNREAD_PROMPT_TOKENS = 128


@dataclass
class FileChecks:
    """Each dataset and model of a grid checked once, however many cells share it."""

    shapes: dict[ModelConfig, ModelArgs] = field(default_factory=dict)
    datasets: set[DatasetConfig] = field(default_factory=set)
    lengths: dict[tuple[DatasetConfig, ModelConfig], list[tuple[int, int]] | None] = field(default_factory=dict)

    def check(self, cell: Cell) -> ModelArgs:
        """ConfigError naming the option where a file would fail the cell on the node; the model's shapes."""
        if cell.dataset not in self.datasets:
            check_dataset(cell.dataset)
            self.datasets.add(cell.dataset)
        if cell.model not in self.shapes:
            args = model_shapes(cell.model)
            check_tokenizer(cell.model, args)
            self.shapes[cell.model] = args
        return self.shapes[cell.model]

    def longest_prompt(self, cell: Cell, args: ModelArgs) -> int:
        """Tokens of the cell's longest prompt as the runner runs it; ConfigError where one kept whole
        cannot fit. A cut (dataset.max_prompt_tokens) is taken at its word; a hub dataset, not read
        here, is assumed to fit UNREAD_PROMPT_TOKENS."""
        fits = prompt_room(cell.engine, args.max_seq_len, cell.max_gen_len)
        if cell.dataset.max_prompt_tokens is not None:
            return min(cell.dataset.max_prompt_tokens, fits)
        key = (cell.dataset, cell.model)
        if key not in self.lengths:  # each dataset tokenized once per tokenizer, however many cells share it
            self.lengths[key] = prompt_lengths(cell.dataset, cell.model)
        lengths = self.lengths[key]
        return min(UNREAD_PROMPT_TOKENS, fits) if lengths is None else check_prompt_fits(cell, args, lengths)
