"""The launch counter: fast's decode step stays fused (a regression adds operators per layer)."""

from __future__ import annotations

import torch

from w2w import distributed
from w2w.bench.launches import per_layer
from w2w.model import ModelArgs

GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)


def test_fast_runs_at_most_18_operators_per_layer_and_no_kv_copy():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    fast, _, ops = per_layer("fast", GQA, torch.float32)
    reference, _, reference_ops = per_layer("llama2", GQA, torch.float32)
    assert fast <= 18 < 45 <= reference, (fast, reference)  # 43 for fast before the fused step
    # repeat_interleave runs as a clone of K and V: the copy of the whole cache fast must not make.
    assert reference_ops["clone"] == 2 and not {"repeat_interleave", "clone", "copy_"} & set(ops)
