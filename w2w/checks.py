"""Plan-time checks that read files: prompt files, checkpoint shapes and tokenizers, before any job is submitted."""

from __future__ import annotations

from dataclasses import dataclass, field

from w2w.cell import Cell, DatasetConfig, ModelConfig
from w2w.data import check_dataset
from w2w.shapes import ModelArgs


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


@dataclass
class FileChecks:
    """Each dataset and model of a grid checked once, however many cells share it."""

    shapes: dict[ModelConfig, ModelArgs] = field(default_factory=dict)
    datasets: set[DatasetConfig] = field(default_factory=set)

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
