"""Engine `llama2`: Meta's Llama 2 code (meta-llama/llama, main branch, July 2023), its schedule over w2w's model.

Differences from Meta's Llama 2 code (`llama/generation.py`, `llama/model.py` of main):
- The model's arithmetic is w2w's (w2w/model.py, meta=True): rotary embedding through a real
  cos/sin table where Meta multiplies complex numbers, RMSNorm casting to float twice where Meta
  casts once, a boolean mask applied with masked_fill where Meta adds an -inf mask built only for
  calls of more than one position; the operators differ, the tokens do not (tested).
- The KV cache is w2w's (batch, heads, length, head_dim), allocated per cell at the cell's batch
  and longest prompt + max_gen_len; Meta's is (max_batch, max_seq, kv heads, head_dim), allocated
  once at load and transposed (copied) before the matmuls.
- total_len is the longest prompt + max_gen_len (checked against model.max_seq_len beforehand),
  where Meta caps it at max_seq_len; no logprobs or echo options.
- Sampling draws from one generator per cell and rank, seeded at the cell's start (Meta seeds once per
  process); a resumed cell restores its state.
- Renamed from `reference` (records of older sweeps with that name read as llama2).

Each difference from the `fast` engine (w2w/engines/fast.py):
- Right padding: every prompt starts at cache slot 0 and rotary position 0 is slot 0; fast
  left-pads and shifts each row's positions instead.
- Decoding starts at the shortest prompt's length (min_prompt_len): the first forward pass covers
  only the slots every row has, and the longer prompts' remaining tokens are forced in one per
  decode step (their sampled token is discarded); fast runs one prefill over the longest prompt.
- Every forward pass computes the logits of every position it covers (the first pass projects
  min_prompt_len positions onto the vocabulary); fast projects the last position only.
- The cache is preallocated, but each step attends the filled prefix, whose length grows with a
  Python-int position, so shapes change every step and nothing is captured as a CUDA graph.
- Grouped-query attention repeats K/V to every query head and runs an explicit matmul with an
  fp32 softmax (Meta's arithmetic); fast calls fused scaled_dot_product_attention.
- The host checks for EOS after every step (a device sync per step); fast checks every
  eos_check_every steps.
- Sampling draws for every row at every step, forced rows included, with torch.multinomial
  (Meta's sample_top_p); fast draws exponential noise for a sync-free race.
- A row whose prompt is shorter than the longest runs longer than max_gen_len (to longest prompt
  + max_gen_len, as Meta's total_len); only its first max_gen_len tokens are returned.
"""

from __future__ import annotations

import torch

from w2w.engines import SPECS, common
from w2w.engines.common import (
    DECODE,
    PREFILL,
    Generation,
    PhaseClock,
    SamplingParams,
    next_token,
    right_pad,
)


class Engine(common.Engine):
    """Meta's schedule; holds no state of its own between batches."""

    spec = SPECS["llama2"]

    def schedule(
        self, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int, cache_len: int,
        clock: PhaseClock, generator: torch.Generator,
    ) -> Generation:
        """Meta's loop; the first forward pass is the prefill phase, each later one a decode step."""
        bsz, device = len(prompts), self.model.device
        min_len, max_len = min(len(p) for p in prompts), max(len(p) for p in prompts)
        total_len = max_len + params.max_gen_len
        tokens, is_prompt = right_pad(prompts, pad_id, total_len, device)
        every_key = torch.ones(bsz, total_len, dtype=torch.bool, device=device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)
        prev, passes, computed = 0, 0, 0
        clock.enter(PREFILL)
        for cur in range(min_len, total_len):
            if passes == 1:
                clock.enter(DECODE)
            positions = torch.arange(prev, cur, device=device).expand(bsz, -1)
            logits = self.model(tokens[:, prev:cur], prev, positions, every_key[:, :cur], meta=True)
            sampled = next_token(logits[:, -1], params, generator)
            sampled = torch.where(is_prompt[:, cur], tokens[:, cur], sampled)
            tokens[:, cur] = sampled
            eos_reached |= ~is_prompt[:, cur] & (sampled == eos_id)
            prev, passes, computed = cur, passes + 1, computed + bsz * (cur - prev)
            if not params.force_max_gen_len and bool(eos_reached.all()):
                break
        clock.enter(None)
        rows = [tokens[row, len(p) : len(p) + params.max_gen_len].tolist() for row, p in enumerate(prompts)]
        if not params.force_max_gen_len:  # slots never reached still hold pad_id: not tokens
            rows = [row[: cur + 1 - len(p)] for row, p in zip(rows, prompts, strict=True)]
        return Generation(rows, sum(len(p) for p in prompts), passes - 1, positions=computed)
