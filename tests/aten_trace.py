"""The ATen operators a call runs, recorded by a dispatch mode; the tiny model and calls of the llama1 golden file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2w.model import ModelArgs

GOLDEN = Path(__file__).parent / "golden" / "llama1_aten_ops.json"
# LLaMA-1's shapes (no GQA), 2 layers; Meta's ModelArgs takes the same fields.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=32)
SEED = 5
MAX_BATCH = 4  # Meta's max_batch_size and max_seq_len: the cache's shape
PROMPTS = [[1, 5, 9, 12, 7, 30], [1, 44], [1, 3, 3, 8]]  # ragged: 6, 2 and 4 tokens
TRACE_TOKENS = [[1, 5, 9, 12, 7], [1, 3, 3, 8, 20]]  # prefill: the first 4 positions; decode: the fifth
PREFILL_LEN = 4
EOS = 2


class OpRecorder(TorchDispatchMode):
    """Records the name of every ATen operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def trace(call: Callable[[], object]) -> list[str]:
    with OpRecorder() as recorder:
        call()
    return recorder.ops


def prefill_and_decode(forward: Callable[[torch.Tensor, int], object]) -> dict[str, list[str]]:
    """The operators of one prefill call (positions 0..3) and the decode call after it (position 4)."""
    tokens = torch.tensor(TRACE_TOKENS)
    with torch.inference_mode():
        prefill = trace(lambda: forward(tokens[:, :PREFILL_LEN], 0))
        decode = trace(lambda: forward(tokens[:, PREFILL_LEN : PREFILL_LEN + 1], PREFILL_LEN))
    return {"prefill": prefill, "decode": decode}
