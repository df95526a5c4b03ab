"""SentencePiece: a tiny model trained in the test; the bundled tiny tokenizer is reproducible."""

from __future__ import annotations

from w2w.tokenizer import TINY_TOKENIZER, Tokenizer, build_tiny_tokenizer, train_tokenizer


def test_trained_tokenizer_round_trips_with_llama_specials(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["energy per token in joules"] * 50
    tok = Tokenizer(train_tokenizer(texts, tmp_path / "t.model", vocab_size=300))
    ids = tok.encode("the lazy fox 42 €")
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(ids[1:]) == "the lazy fox 42 €"  # byte fallback covers unseen characters
    assert tok.vocab_size == 300


def test_bundled_tiny_tokenizer_is_what_the_build_makes(tmp_path):
    rebuilt = build_tiny_tokenizer(tmp_path / "tiny.model")
    assert rebuilt.read_bytes() == TINY_TOKENIZER.read_bytes()
    assert Tokenizer(TINY_TOKENIZER).vocab_size == 512
