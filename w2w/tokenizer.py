"""SentencePiece tokenizer as LLaMA uses it (BOS on prompts, EOS ends a response)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from w2w.config import ConfigError

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.model"


def check_vocab(path: Path, pieces: int, model_name: str, vocab_size: int) -> None:
    """The tokenizer's pieces are the model's vocabulary (checked when planning and when loading)."""
    if pieces != vocab_size:
        raise ConfigError(
            f"tokenizer {path} has {pieces} pieces but model {model_name} has vocab_size={vocab_size}: "
            f"set model.tokenizer_path to the model's tokenizer"
        )


def piece_count(path: Path) -> int:
    """The tokenizer's vocabulary size, without building a Tokenizer."""
    if not path.is_file():
        raise ConfigError(f"tokenizer model {path} not found: set model.tokenizer_path")
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


class Tokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found: set model.tokenizer_path")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA's tokenizer has no pad piece (pad_id -1); padding slots are masked, any id will do.
        self.pad_id = max(self.sp.pad_id(), 0)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int) -> Path:
    """Train a small LLaMA-style (BPE, byte fallback) SentencePiece model, deterministically."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        normalization_rule_name="identity",  # as LLaMA's; NFKC tables would add 240 kB
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def tiny_corpus() -> list[str]:
    from w2w.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, WORDS, synthetic_prompts

    return [*synthetic_prompts(2000, seed=0), " ".join(WORDS), ALPACA_WITH_INPUT, ALPACA_NO_INPUT]


def build_tiny_tokenizer(path: str | Path = TINY_TOKENIZER) -> Path:
    """The bundled tokenizer of the tiny preset (`make tiny-tokenizer` rebuilds it)."""
    return train_tokenizer(tiny_corpus(), path, vocab_size=512)


if __name__ == "__main__":
    print(build_tiny_tokenizer())
