"""Engine `llama1`: the paper's program, Meta's LLaMA-1 code (branch llama_v1) as an engine.

It follows `llama/generation.py` and `llama/model.py` of meta-llama/llama's `llama_v1` branch,
operator for operator per forward call (tests/test_llama1.py checks the ATen sequence against one
traced from Meta's code, tests/golden/llama1_aten_ops.json):
- Schedule: right-padded prompts; decoding starts at the shortest prompt's length with the longer
  prompts' tokens forced in one per step, and always runs to total_len = min(cache length,
  longest prompt + max_gen_len), whatever EOS says (no early stop); the text is cut at the first
  EOS afterwards.
- Arithmetic: rotary embedding through a complex polar table and view_as_complex, RMSNorm with
  one float cast, an additive -inf mask built only when a call covers more than one position,
  an explicit matmul attention with an fp32 softmax, logits of the last position only.
- Memory: a KV cache (max batch, max_seq_len, local heads, head_dim) per layer, held by this
  engine, sliced [:bsz, :start+seqlen] and transposed before the matmuls (so matmul copies K and
  V in every layer at every step).
- Sampling: Meta's sample_top_p, operator for operator: an in-place boolean-mask assignment
  (`probs_sort[mask] = 0.0`, an index_put_ that on CUDA makes the host wait for the mask's count
  at every sampled step), an in-place div_, multinomial and gather.

Differences from Meta's llama_v1 code:
- The forward runs over the weights of w2w's Transformer (FairScale layers, Meta's parameter
  names and layout); the engine holds the cache and the rotary table, not the model.
- Meta's `load` allocates the cache once per process at the caller's max_batch_size and
  max_seq_len (example.py: 32 and 512), and a run of example.py serves one setting; here it is
  allocated once per cell, at the cell's batch size and model.max_seq_len (EngineSpec
  cache_at_max_seq_len; launch/plan.py counts the same), and reused by every batch of the cell.
  The matmuls read only the sliced prefix, so the size changes memory, not the work per step.
- Meta allocates with `.cuda()` under the default tensor type (fp16); here on the model's device
  in the model's dtype. The rotary table (2 x max_seq_len positions, as Meta's) is built on that device once; Meta builds it on the host and moves it in every forward call
  (the .to() calls are kept: no-ops, but dispatched, as are Meta's).
- The draws come from one generator per cell and rank seeded at the cell's start (Meta seeds the
  global generator once per process); greedy=true is Meta's temperature 0 (argmax).
- Grouped-query attention (n_kv_heads != n_heads) did not exist in LLaMA-1 and is refused;
  so is rope scaling (Llama 3.1).
- A row whose prompt is shorter than the longest returns only its first max_gen_len new tokens,
  as Meta's cut does, though the loop computes past them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from w2w.engines import SPECS, common
from w2w.engines.common import (
    DECODE,
    PREFILL,
    Generation,
    KvCache,
    PhaseClock,
    SamplingParams,
    right_pad,
)
from w2w.model import RMSNorm, Transformer


def polar_table(head_dim: int, length: int, theta: float, device: torch.device) -> torch.Tensor:
    """(length, head_dim // 2) complex64: e^(i * position * frequency), LLaMA-1's rotary table."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device), freqs).float()
    return torch.polar(torch.ones_like(angles), angles)


def rotate(q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, H, D) rotated by table (S, D/2) through complex numbers; both are viewed as
    complex before the table is broadcast, as LLaMA-1 orders it."""
    q_pairs = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    k_pairs = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    table = table.view(1, q.shape[1], 1, q_pairs.shape[-1])
    q_out = torch.view_as_real(q_pairs * table).flatten(3)
    k_out = torch.view_as_real(k_pairs * table).flatten(3)
    return q_out.type_as(q), k_out.type_as(k)


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 1) tokens: Meta's nucleus sampling, its operators in its order (the boolean-mask assignment
    included), drawn from `generator`."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    chosen = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, chosen)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> tokens (B,), as LLaMA-1's generate: softmax of logits / temperature and
    sample_top_p, or argmax where greedy (Meta's temperature 0)."""
    if params.greedy:
        chosen = torch.argmax(logits, dim=-1)
    else:
        chosen = sample_top_p(torch.softmax(logits / params.temperature, dim=-1), params.top_p, generator)
    return chosen.reshape(-1)


class Engine(common.Engine):
    """LLaMA-1's program; holds its KV cache and rotary table, allocated once per cell shape."""

    spec = SPECS["llama1"]  # no GQA, no rope scaling; runs to max_seq_len as Meta's total_len; its own cache

    def __init__(self, model: Transformer):
        super().__init__(model)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.table: torch.Tensor | None = None

    def prepare(self, batch: int, cache_len: int) -> None:
        """Allocate the cache at (batch, cache_len): Meta's (max_batch_size, max_seq_len), generate()
        passing the cell's batch size and model.max_seq_len; kept while the length stays and the batch
        fits (a smaller last batch uses the first rows)."""
        if self.cache and self.cache[0][0].shape[0] >= batch and self.cache[0][0].shape[1] == cache_len:
            return
        if cache_len > self.model.args.max_seq_len:
            raise ValueError(f"prompt + max_gen_len = {cache_len} tokens exceeds model.max_seq_len="
                             f"{self.model.args.max_seq_len}")
        attn, model = self.model.layers[0].attention, self.model
        shape = (batch, cache_len, attn.local_heads, attn.head_dim)
        dtype, device = model.norm.weight.dtype, model.device
        self.cache = []  # free the old cache before allocating the new one
        self.cache = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                      for _ in model.layers]
        self.table = polar_table(attn.head_dim, 2 * cache_len, model.args.rope_theta, device)

    @property
    def cache_len(self) -> int:
        return self.cache[0][0].shape[1]

    @property
    def kv_cache(self) -> KvCache | None:
        """Meta's layout (max batch, max_seq_len, local heads, head_dim), K and V per layer."""
        if not self.cache:
            return None
        first = self.cache[0][0]
        return KvCache.of(tuple(first.shape), first.element_size(), 2 * len(self.cache))

    def norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """RMSNorm with one float cast (w2w's model casts twice)."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight

    def attention(self, index: int, x: torch.Tensor, start: int, table: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        attn = self.model.layers[index].attention
        bsz, seqlen, _ = x.shape
        q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)
        q = q.view(bsz, seqlen, attn.local_heads, attn.head_dim)
        k = k.view(bsz, seqlen, attn.local_heads, attn.head_dim)
        v = v.view(bsz, seqlen, attn.local_heads, attn.head_dim)
        q, k = rotate(q, k, table)
        # No-op conversions (the cache is in q's dtype and device already), dispatched as aten.to
        # all the same: kept so the operator sequence is LLaMA-1's, which converts its cache here.
        cache_k, cache_v = self.cache[index]
        cache_k, cache_v = cache_k.to(q), cache_v.to(q)
        end = start + seqlen
        cache_k[:bsz, start:end] = k
        cache_v[:bsz, start:end] = v
        # (B, S, H, D) slices of the cache, transposed to (B, H, S, D): matmul copies them.
        keys, values = cache_k[:bsz, :end], cache_v[:bsz, :end]
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(attn.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return attn.wo(out)

    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (B, vocab) of the last position of tokens (B, S) written at cache slots start..start+S."""
        seqlen = tokens.shape[1]
        h = self.model.tok_embeddings(tokens)
        table = self.table.to(h.device)[start : start + seqlen]  # aten.to, a no-op: as LLaMA-1 moves its table
        mask = None
        if seqlen > 1:  # one position sees every filled slot: no mask
            mask = torch.full((1, 1, seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=start + 1).type_as(h)
        for index, layer in enumerate(self.model.layers):
            h = h + self.attention(index, self.norm(h, layer.attention_norm), start, table, mask)
            h = h + layer.feed_forward(self.norm(h, layer.ffn_norm))
        h = self.norm(h, self.model.norm)
        return self.model.output(h[:, -1, :]).float()

    def schedule(
        self, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int, cache_len: int,
        clock: PhaseClock, generator: torch.Generator,
    ) -> Generation:
        """LLaMA-1's loop, to total_len whatever EOS says; the first call is the prefill phase."""
        bsz, device = len(prompts), self.model.device
        min_len, max_len = min(len(p) for p in prompts), max(len(p) for p in prompts)
        total_len = min(self.cache_len, max_len + params.max_gen_len)
        tokens, is_prompt = right_pad(prompts, pad_id, total_len, device)
        prev, calls, computed = 0, 0, 0
        clock.enter(PREFILL)
        for cur in range(min_len, total_len):
            if calls == 1:
                clock.enter(DECODE)
            logits = self.forward(tokens[:, prev:cur], prev)
            sampled = next_token(logits, params, generator)
            tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], sampled)
            prev, calls, computed = cur, calls + 1, computed + bsz * (cur - prev)
        clock.enter(None)
        rows = [tokens[row, len(p) : len(p) + params.max_gen_len].tolist() for row, p in enumerate(prompts)]
        return Generation(rows, sum(len(p) for p in prompts), calls - 1, positions=computed)
