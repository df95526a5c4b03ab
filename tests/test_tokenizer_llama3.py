"""Llama 3 tokenizers: a tiktoken ranks file and a `tokenizers` tokenizer.json, built here, encode
text in w2w exactly as those libraries do; BOS/EOS are Llama 3's; w2w-run uses them."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.conftest import cli
from w2w.errors import ConfigError
from w2w.records import read_record
from w2w.tokenizer import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    HfTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    open_tokenizer,
)

TEXTS = [
    "The energy of a model grows with its size.",
    "Janet's ducks lay 16 eggs per day; she sells 1,234 of them for $2.50 each!\n\nAnswer:",
    "  leading spaces, tabs\tand unicode: naïve café 東京 🚀",
    "special text stays text: <|begin_of_text|> <|eot_id|>",
    "",
]
MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b"er", b"en", b"gy", b"ergy", b" e", b" energy"]


def write_ranks(path: Path) -> Path:
    """A tiktoken BPE file as Meta ships it: 'base64(token) rank' per line, bytes first, then merges."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


@pytest.fixture
def ranks_file(tmp_path) -> Path:
    return write_ranks(tmp_path / "tokenizer.model")


def test_tiktoken_file_encodes_as_tiktoken_does(ranks_file):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(ranks_file))
    reference = tiktoken.Encoding(
        name="llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    tok = open_tokenizer(ranks_file)
    assert isinstance(tok, TiktokenTokenizer)
    for text in TEXTS:
        ids = reference.encode(text, allowed_special=set(), disallowed_special=())
        assert tok.encode(text) == [tok.bos_id, *ids]
        assert tok.decode(tok.encode(text, bos=False)) == text
    assert any(len(reference.decode_single_token_bytes(i)) > 1 for i in tok.encode(TEXTS[0]))  # merges used
    base = len(MERGES) + 256
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (base + 256, base, base + 1)
    assert TiktokenTokenizer(ranks_file, "<|eot_id|>").eos_id == base + 9  # Meta's ids: 128000, 128001, 128009


def test_tokenizers_json_encodes_as_tokenizers_and_transformers_do(tmp_path):
    from tokenizers import Tokenizer as HfFast
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fast = HfFast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    fast.train_from_iterator(TEXTS * 20, trainer)
    path = tmp_path / "tokenizer.json"
    fast.save(str(path))
    tok = open_tokenizer(path)
    assert isinstance(tok, HfTokenizer)
    library, transformers_tok = HfFast.from_file(str(path)), PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXTS:
        ids = library.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == [tok.bos_id, *ids]
        assert ids == transformers_tok.encode(text, add_special_tokens=False)
        # As in Hugging Face's own Llama 3 tokenizer, special-token text matches the special token
        # (Meta's tiktoken path keeps it plain text), and decoding drops specials.
        assert tok.decode(ids) == text if "<|" not in text else specials[0] not in tok.decode(ids)
    assert (tok.bos_id, tok.eos_id) == (library.token_to_id(specials[0]), library.token_to_id(specials[1]))
    assert HfTokenizer(path, "<|eot_id|>").eos_id == library.token_to_id("<|eot_id|>")
    assert tok.vocab_size == library.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ConfigError, match=r"no special token '<\|eom\|>': set model.eos_token"):
        HfTokenizer(path, "<|eom|>")


def test_sentencepiece_files_still_open_as_sentencepiece():
    from w2w.tokenizer import TINY_TOKENIZER

    assert isinstance(open_tokenizer(TINY_TOKENIZER), Tokenizer)
    assert open_tokenizer(TINY_TOKENIZER, "</s>").eos_id == 2
    with pytest.raises(ConfigError, match=r"set model\.eos_token"):
        open_tokenizer(TINY_TOKENIZER, "<|eot_id|>")


def test_a_damaged_ranks_file_names_the_line(ranks_file):
    ranks_file.write_text(ranks_file.read_text() + "not base64 at all\n")
    with pytest.raises(ConfigError, match=r"tokenizer.model:270: not a tiktoken BPE line"):
        TiktokenTokenizer(ranks_file)


def test_w2w_run_with_a_llama3_tokenizer(ranks_file, tmp_path):
    vocab = len(MERGES) + 256 + 256
    cli("w2w.run_cli", f"model.tokenizer_path={ranks_file}", f"model.vocab_size={vocab}", "model.rope_theta=500000",
        "precision=fp32", "max_gen_len=4", "dataset.num_prompts=2", "batch_size=2", f"sweep_dir={tmp_path}")
    (record,) = [read_record(p) for p in tmp_path.glob("cells/*/rank-00000.json")]
    assert record.status == "ok" and record.counts.responses == 2
    tok = TiktokenTokenizer(ranks_file)
    assert record.counts.prompt_tokens > 0 and tok.vocab_size == vocab
