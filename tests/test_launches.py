"""The launch counter: fast's decode step stays fused (a regression adds operators or kernels per layer)."""

from __future__ import annotations

import re

import pytest
import torch

from w2w import distributed, engines
from w2w.bench.launches import ADDMM_COPY, main, per_layer
from w2w.model import ModelArgs

GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    distributed.init("cpu", timeout_s=60)
    distributed.init_model_parallel(1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_runs_14_cuda_kernels_per_layer_and_no_kv_copy(dtype):
    fast, fast_cuda = per_layer("fast", GQA, dtype)
    reference, reference_cuda = per_layer("llama2", GQA, dtype)
    # Estimated CUDA kernels: 2 RMSNorms, QKV and W1/W3 GEMMs, RoPE 2, one cache write, attention, SiLU,
    # the product, and 2 output GEMMs onto the residual (a copy and a GEMM each).
    assert fast_cuda.per_layer == 14 < 45 <= reference_cuda.per_layer, (fast_cuda.per_layer, reference_cuda.per_layer)
    assert fast_cuda.layer["_fused_rms_norm"] == 2 and fast_cuda.layer[ADDMM_COPY] == 2, fast_cuda.layer
    assert not {"pow", "rsqrt", "mean"} & set(fast_cuda.layer)  # the norm's parts are inside its kernel
    # On the CPU the norm decomposes (pow, mean, add, rsqrt and two products each): more operators than kernels.
    assert fast.per_layer > fast_cuda.per_layer and fast.layer["rsqrt"] == 2, fast.layer
    # repeat_interleave runs as a clone of K and V: the copy of the whole cache fast must not make;
    # no cast in the layer outside the norm (bf16: RoPE computes in fp32 inside its two operators).
    assert reference.layer["clone"] == 2
    assert not {"repeat_interleave", "clone", "copy_"} & set(fast.layer), fast.layer
    assert fast.layer["index_copy_"] == 1, fast.layer  # one cache write


def test_the_bench_prints_cpu_and_estimated_cuda_counts_for_every_engine(capsys):
    assert main(["--kv-heads", "4", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out
    for name in engines.ENGINES:
        assert re.search(rf"^ +{name} +MHA fp32: CPU +[\d.]+ per layer .*; CUDA est\. +[\d.]+ per layer", out, re.M), out
