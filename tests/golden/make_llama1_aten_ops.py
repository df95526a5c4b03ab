"""Write llama1_aten_ops.json from Meta's llama_v1 code: python tests/golden/make_llama1_aten_ops.py LLAMA_V1_CHECKOUT.

Meta's code is imported from the checkout, unmodified, and run on CPU (gloo, world 1, fp32) on
tests/aten_trace.py's tiny model: Tensor.cuda is made a no-op (the cache allocations in
llama/model.py and the token tensor in llama/generation.py call it) and sentencepiece, which
llama/tokenizer.py imports, is stubbed (no tokenizer is used: prompts are token lists).
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch
from fairscale.nn.model_parallel.initialize import initialize_model_parallel

from tests import aten_trace as t
from w2w.model import random_state_dict


class PromptTokens:
    """What LLaMA.generate asks of a tokenizer, for prompts given as token lists."""

    pad_id, eos_id = -1, t.EOS

    def encode(self, tokens: list[int], bos: bool, eos: bool) -> list[int]:
        return list(tokens)

    def decode(self, tokens: list[int]) -> list[int]:
        return tokens


def main(checkout: str) -> None:
    sys.path.insert(0, checkout)
    sys.modules["sentencepiece"] = types.SimpleNamespace(SentencePieceProcessor=None)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU: Meta's code calls .cuda() unconditionally
    from llama import LLaMA, ModelArgs, Transformer

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29517"),
                   "RANK": "0", "WORLD_SIZE": "1"}
    torch.distributed.init_process_group("gloo")
    initialize_model_parallel(1)
    a = t.ARGS
    model = Transformer(ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, vocab_size=a.vocab_size,
                                  multiple_of=a.multiple_of, norm_eps=a.norm_eps, max_batch_size=t.MAX_BATCH,
                                  max_seq_len=a.max_seq_len))
    model.load_state_dict(random_state_dict(a, t.SEED), strict=True)
    ops = t.prefill_and_decode(model.eval().forward)
    out = LLaMA(model, PromptTokens()).generate(t.PROMPTS, max_gen_len=12, temperature=0)
    golden = {
        "comment": (
            "ATen operators (str(func) under a TorchDispatchMode) of one prefill call (positions 0-3) and one decode "
            "call (position 4) of Meta's llama_v1 Transformer.forward (meta-llama/llama branch llama_v1, "
            "llama/model.py), on CPU, gloo, world 1, fp32, tests/aten_trace.py's tiny model (w2w.model."
            "random_state_dict seed 5); meta_greedy: LLaMA.generate(temperature=0, max_gen_len=12) new tokens per "
            "prompt, cut at EOS (id 2). Written by tests/golden/make_llama1_aten_ops.py (Meta's code unmodified; "
            f"Tensor.cuda a no-op, sentencepiece stubbed) with torch {torch.__version__}."),
        "prefill": ops["prefill"],
        "decode": ops["decode"],
        "meta_greedy": {"12": [row[len(p):] for row, p in zip(out, t.PROMPTS, strict=True)]},
    }
    t.GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"{t.GOLDEN}: prefill {len(ops['prefill'])} operators, decode {len(ops['decode'])}")


if __name__ == "__main__":
    main(sys.argv[1])
