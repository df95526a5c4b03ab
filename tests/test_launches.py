"""The launch counter: fast's decode step stays fused (a regression adds operators per layer)."""

from __future__ import annotations

import pytest
import torch

from w2w import distributed
from w2w.bench.launches import per_layer
from w2w.model import ModelArgs

GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_runs_at_most_12_operators_per_layer_and_no_kv_copy(dtype):
    fast, _, ops = per_layer("fast", GQA, dtype)
    unfolded, _, unfolded_ops = per_layer("fast-unfolded", GQA, dtype)
    reference, _, reference_ops = per_layer("llama2", GQA, dtype)
    # 43 for fast before the fused step, 18 (22 in bf16) before one operator per RMSNorm and RoPE in two
    assert fast <= 12 and unfolded <= 14 < 45 <= reference, (fast, unfolded, reference)
    assert unfolded_ops["mul"] - ops["mul"] == 2  # the gain multiplies the folded weights hold
    # repeat_interleave runs as a clone of K and V: the copy of the whole cache fast must not make;
    # no cast either (bf16: RoPE computes in fp32 inside its two operators).
    assert reference_ops["clone"] == 2
    assert not {"repeat_interleave", "clone", "copy_", "_to_copy"} & set(ops), ops
    assert ops["index_copy_"] == 1 and ops["_weight_norm_interface"] == 2, ops  # one cache write, one op per norm
