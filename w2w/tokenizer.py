"""LLaMA tokenizers (BOS on prompts, EOS ends a response): SentencePiece (LLaMA 1, 2), tiktoken BPE
(Meta's Llama 3 tokenizer.model) and Hugging Face tokenizer.json (Llama 3 checkpoints on the Hub)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from w2w.errors import ConfigError

TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.model"
LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
# Meta's Llama 3.1 tokenizer.py: the split pattern and the 256 special tokens after the BPE ranks.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
_LLAMA3_NAMED = (LLAMA3_BOS, LLAMA3_EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", LLAMA3_EOT, "<|python_tag|>")
LLAMA3_SPECIAL_TOKENS = (*_LLAMA3_NAMED, *(f"<|reserved_special_token_{2 + i}|>"
                                           for i in range(LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED))))
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")


class TokenizerLike(Protocol):
    path: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


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


def _special_id(ids: dict[str, int], token: str, path: Path, option: str) -> int:
    if token not in ids:
        raise ConfigError(f"{path} has no special token {token!r}: set {option} to one it has")
    return ids[token]


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one 'base64(token) rank' line per token (what tiktoken's load_tiktoken_bpe reads)."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        if not _TIKTOKEN_LINE.fullmatch(line):
            raise ConfigError(f"{path}:{number}: not a tiktoken BPE line ('base64 rank'): set model.tokenizer_path")
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenTokenizer:
    """Meta's Llama 3 tokenizer.model: tiktoken BPE ranks, then the 256 special tokens."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        import tiktoken

        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        specials = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=specials)
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = specials[LLAMA3_BOS]
        self.eos_id = _special_id(specials, eos_token or LLAMA3_EOS, self.path, "model.eos_token")
        self.pad_id = 0  # padding slots are masked; any id will do

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # Special-token text in a prompt is plain text, as in Meta's encode (allowed_special=set()).
        ids = self.model.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)


class HfTokenizer:
    """A Hugging Face tokenizer.json read with `tokenizers`; BOS and EOS by name (Llama 3's or LLaMA's)."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as HfFast

        self.path = Path(path)
        self.model = HfFast.from_file(str(self.path))
        vocab = self.model.get_vocab(with_added_tokens=True)
        self.vocab_size = self.model.get_vocab_size(with_added_tokens=True)
        llama3 = LLAMA3_BOS in vocab
        self.bos_id = _special_id(vocab, LLAMA3_BOS if llama3 else "<s>", self.path, "model.tokenizer_path")
        eos = eos_token or (LLAMA3_EOS if llama3 else "</s>")
        self.eos_id = _special_id(vocab, eos, self.path, "model.eos_token")
        self.pad_id = 0

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.model.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids, skip_special_tokens=True)


def is_tiktoken_file(path: Path) -> bool:
    with path.open("rb") as f:
        return bool(_TIKTOKEN_LINE.fullmatch(f.readline().rstrip(b"\r\n")))


def open_tokenizer(path: str | Path, eos_token: str | None = None) -> TokenizerLike:
    """The tokenizer a file holds: tokenizer.json (tokenizers), a tiktoken BPE file, or SentencePiece."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} not found: set model.tokenizer_path")
    if path.suffix == ".json":
        return HfTokenizer(path, eos_token)
    if is_tiktoken_file(path):
        return TiktokenTokenizer(path, eos_token)
    tokenizer = Tokenizer(path)
    if eos_token is not None:
        pieces = {tokenizer.sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
        tokenizer.eos_id = _special_id(pieces, eos_token, path, "model.eos_token")
    return tokenizer


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
    import sys

    # `make tiny-tokenizer [TINY_TOKENIZER_OUT=FILE]`: the bundled file, or FILE.
    print(build_tiny_tokenizer(*sys.argv[1:2]))


def cut_prompt(ids: list[int], max_len: int, bos_id: int) -> list[int]:
    """BOS and the last max_len - 1 tokens (the end is where the question is); without BOS, the last max_len."""
    if len(ids) <= max_len:
        return ids
    if ids[0] != bos_id:
        return ids[len(ids) - max_len:]
    return [bos_id, *ids[len(ids) - (max_len - 1):]]


def encode_prompts(prompts: list[str], tokenizer: TokenizerLike, max_prompt_len: int | None,
                   fits: int | None = None, *, rows: list[int] | None = None,
                   max_seq_len: int | None = None) -> tuple[list[list[int]], int]:
    """The prompts' token ids, each cut to max_prompt_len tokens with BOS kept first (None: kept whole);
    and how many were cut. fits: the longest a whole prompt may be (ValueError beyond it, naming the row,
    0-based in rows, counted from 1; --plan says so first)."""
    encoded, cut = [], 0
    for index, text in enumerate(prompts):
        ids = tokenizer.encode(text)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            cut += 1
            ids = cut_prompt(ids, max_prompt_len, tokenizer.bos_id)
        if fits is not None and len(ids) > fits:
            where = f"dataset row {rows[index] + 1}" if rows is not None else f"prompt {index + 1}"
            # a shorter generation only helps a prompt shorter than the whole context
            lower = "lower max_gen_len, " if max_seq_len is None or len(ids) < max_seq_len else ""
            raise ValueError(f"{where}: its prompt of {len(ids)} tokens does not fit the {fits} that "
                             f"model.max_seq_len - max_gen_len leaves: {lower}raise model.max_seq_len, or set "
                             "dataset.max_prompt_tokens to cut it")
        encoded.append(ids)
    return encoded, cut
