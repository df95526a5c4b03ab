"""The model-parallel LLaMA gives the same logits at every shard count."""

from __future__ import annotations

import pytest
import torch

from tests.parallel import run_parallel
from w2w import distributed
from w2w.model import ModelArgs, build_model, random_state_dict

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=None, vocab_size=96, multiple_of=16, max_seq_len=64)
GQA = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=96, multiple_of=16, max_seq_len=64)


def _prompt_logits(args: ModelArgs, world: int) -> torch.Tensor:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(world, world)
    rank = torch.distributed.get_rank()
    model = build_model(args, random_state_dict(args, seed=3, rank=rank, world=world), torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 16)
    valid = torch.ones(2, 16, dtype=torch.bool)
    prefill = model(tokens[:, :9], 0, torch.arange(9).expand(2, 9), valid[:, :9])
    step = model(tokens[:, 9:], 9, torch.full((2, 1), 9), valid[:, :10])
    return torch.cat([prefill, step], dim=1)


@pytest.mark.parametrize("args", [ARGS, GQA], ids=["mha", "gqa"])
def test_same_logits_at_world_sizes_1_2_4(args):
    reference = run_parallel(1, _prompt_logits, args, 1)[0]
    assert torch.isfinite(reference).all()
    for world in (2, 4):
        per_rank = run_parallel(world, _prompt_logits, args, world)
        for logits in per_rank:
            assert (logits - reference).abs().max().item() <= 1e-4


def test_incremental_decode_matches_full_forward():
    """KV cache correctness: prefill + one decode step == one forward over all tokens."""
    full = run_parallel(1, _full_forward, ARGS)[0]
    incremental = run_parallel(1, _prompt_logits, ARGS, 1)[0]
    assert (full - incremental).abs().max().item() <= 1e-4


def _full_forward(args: ModelArgs) -> torch.Tensor:
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)
    model = build_model(args, random_state_dict(args, seed=3), torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    model.setup_caches(2, 16)
    return model(tokens, 0, torch.arange(10).expand(2, 10), torch.ones(2, 10, dtype=torch.bool))


def _gqa_logits_with(has_gqa: bool) -> torch.Tensor:
    from unittest import mock

    from w2w import model as model_module

    with mock.patch.object(model_module, "SDPA_HAS_GQA", has_gqa):
        return _prompt_logits(GQA, 1)


def test_gqa_without_enable_gqa_repeats_kv_to_the_same_logits():
    """torch < 2.5 has no enable_gqa (pyproject's floor is 2.1): the repeated-K/V path is that torch's."""
    fused, repeated = run_parallel(1, _gqa_logits_with, True)[0], run_parallel(1, _gqa_logits_with, False)[0]
    assert (fused - repeated).abs().max().item() <= 1e-5


def test_sdpa_is_asked_for_enable_gqa_only_for_grouped_heads():
    from unittest import mock

    from w2w import model as model_module

    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with mock.patch.object(model_module.F, "scaled_dot_product_attention", autospec=True) as sdpa:
        model_module.attend(q, kv, kv, mask, meta=False)
    assert "enable_gqa" not in sdpa.call_args.kwargs  # multi-head: a call torch 2.1 accepts
