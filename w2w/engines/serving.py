"""Continuous batching over fast's decode step: requests admitted into free slots between steps.

The batch has `max_slots` rows, and the KV cache is a ring of `cache_len` columns shared by every
row: each decode step writes every row at one column (a device counter that wraps), exactly as
offline fast does, so the decode step is fast's fused step unchanged (the same operators per
layer, static shapes, one CUDA graph per slot count). What makes a row its own request is that
row's attention mask and rotary position, which are per row already: a request admitted when the
step column is c has its prompt's keys and values copied into columns c-L .. c-1 (mod cache_len)
of its row, its mask reset to exactly those columns, and its position set to L; the steps then
write c, c+1, ... Attention does not care where in the row a key sits (positions are in the
rotation, validity in the mask), and prompt + max_gen_len <= cache_len keeps a request from
wrapping onto itself.

Prefill: each admitted prompt whole, alone (batch 1, no padding), through the model's own
forward into a scratch cache, then copied into its row; admissions happen between decode steps,
in arrival order, into the lowest free slots. A prefill is its own step (no chunking beside the
decode). A slot frees when its request draws EOS (unless force_max_gen_len) or reaches
max_gen_len. The host reads the step's tokens after every step: that read is each token's
timestamp (the inter-token latency), and it frees slots at once.

Under model parallelism rank 0 decides how many of the waiting requests to admit (by its clock)
and broadcasts that count before each step; the admitted requests, slots and steps follow from it
alike on every rank, and the tokens are identical on every rank.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from w2w.engines.common import EOS, MAX_GEN_LEN, SamplingParams
from w2w.engines.fast import Engine as FastEngine
from w2w.engines.fast import StaticDecoder
from w2w.model import KVCache

PREFILL_STEP, DECODE_STEP = "prefill", "decode"


@dataclass(frozen=True)
class Request:
    """What the loop serves: a tokenized prompt arriving arrival_s after the loop starts."""

    index: int
    prompt: list[int]
    arrival_s: float


@dataclass
class Served:
    """One request as served; times in s from the loop's start (monotonic)."""

    index: int
    prompt_tokens: int
    arrival_s: float
    slot: int = -1
    admit_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: list[int] = field(default_factory=list)  # output tokens (EOS dropped)
    token_s: list[float] = field(default_factory=list)  # when each output token reached the host
    generated: int = 0  # tokens drawn, an EOS included
    ended_by: str | None = None  # common.EOS | common.MAX_GEN_LEN


@dataclass(frozen=True)
class Step:
    """One forward pass: its kind, when it ended (s from the start), the positions each request
    computed in it (request index -> positions), and all positions computed (idle slots too)."""

    kind: str
    end_s: float
    positions: dict[int, int]
    computed: int


@dataclass
class ServeResult:
    served: list[Served]
    steps: list[Step]


class RingDecoder(StaticDecoder):
    """fast's decoder with the step column wrapping around the cache (a ring), and each row's
    position held below the rope table's end (an idle row keeps stepping)."""

    def __init__(self, fused, batch: int, cache_len: int, greedy: bool, capture=None):
        super().__init__(fused, batch, cache_len, greedy, capture)
        self.cache_len = cache_len
        self.max_pos = fused.model.args.max_seq_len - 1

    def step(self) -> None:
        self.mask.index_fill_(3, self.slot, 0.0)
        token = self.choose(self.fused(self.token, self.slot, self.pos, self.mask))
        self.token.copy_(token)
        self.slot.add_(1).remainder_(self.cache_len)
        self.pos.add_(1).clamp_(max=self.max_pos)


def _admit_count(decide: Callable[[int], int] | None, count: int) -> int:
    return count if decide is None else decide(count)


class ContinuousBatch:
    """The serving loop over one fast engine: max_slots rows over a ring cache of cache_len columns."""

    def __init__(self, engine: FastEngine, max_slots: int, cache_len: int, params: SamplingParams,
                 eos_id: int, generator: torch.Generator):
        self.engine, self.model = engine, engine.model
        self.params, self.eos_id, self.generator = params, eos_id, generator
        self.max_slots, self.cache_len = max_slots, cache_len
        self.model.setup_caches(max_slots, cache_len)
        self.decoder = engine.decoder(max_slots, cache_len, params, RingDecoder)
        self.decoder.set_sampling(params)
        engine.fused.wait_s = params.deadline_s
        layer = self.model.layers[0].attention
        self.scratch = [KVCache(1, cache_len, block.attention.local_kv_heads, layer.head_dim,
                                self.model.norm.weight.dtype, self.model.device) for block in self.model.layers]
        self.column = 0  # the host's copy of the decoder's step column
        self.decoder.slot.zero_()
        self.decoder.pos.zero_()
        self.decoder.mask.zero_()  # idle rows attend something: an all -inf row would give NaN

    def _prefill(self, prompt: list[int], row: int) -> int:
        """The prompt alone through the model's forward into the scratch cache, copied into row's
        columns before the step column; returns its first token (set as the row's next input)."""
        length, device = len(prompt), self.model.device
        tokens = torch.tensor([prompt], device=device)
        positions = torch.arange(length, device=device)[None]
        caches = [block.attention.cache for block in self.model.layers]
        for block, scratch in zip(self.model.layers, self.scratch, strict=True):
            block.attention.cache = scratch
        try:
            logits = self.model(tokens, 0, positions, torch.ones_like(tokens, dtype=torch.bool), last_only=True)[:, -1]
        finally:
            for block, cache in zip(self.model.layers, caches, strict=True):
                block.attention.cache = cache
        columns = torch.tensor([(self.column - length + k) % self.cache_len for k in range(length)], device=device)
        for cache, scratch in zip(caches, self.scratch, strict=True):
            cache.kv[:, row].index_copy_(2, columns, scratch.kv[:, 0, :, :length])
        decoder = self.decoder
        decoder.draw(self.generator)
        first = decoder.choose(logits.expand(self.max_slots, -1))[row]
        decoder.token[row] = first
        decoder.pos[row] = length
        decoder.mask[row].fill_(float("-inf"))
        decoder.mask[row, 0, 0].index_fill_(0, columns, 0.0)
        return int(first)

    def _emit(self, request: Served, token: int, now_s: float) -> bool:
        """Take one drawn token; True when the request has ended."""
        request.generated += 1
        if token == self.eos_id and not self.params.force_max_gen_len:
            request.ended_by = EOS
        else:
            request.tokens.append(token)
            request.token_s.append(now_s)
        if request.ended_by is None and request.generated >= self.params.max_gen_len:
            request.ended_by = MAX_GEN_LEN
        if request.ended_by is not None:
            request.finish_s = now_s
        return request.ended_by is not None

    def serve(self, requests: list[Request], now: Callable[[], float], wait: Callable[[float], None],
              decide: Callable[[int], int] | None = None) -> ServeResult:
        """Serve `requests` (sorted by arrival_s) from now(); `wait(s)` sleeps while nothing is active;
        decide(count): rank 0's admission count, broadcast (None: this process decides alone)."""
        t0 = now()
        served = {r.index: Served(r.index, len(r.prompt), r.arrival_s) for r in requests}
        prompts = {r.index: r.prompt for r in requests}
        pending = deque(r.index for r in requests)
        free = list(range(self.max_slots))
        active: dict[int, Served] = {}
        steps: list[Step] = []
        while pending or active:
            elapsed = now() - t0
            if decide is None or torch.distributed.get_rank() == 0:
                if not active and pending and served[pending[0]].arrival_s > elapsed:
                    wait(served[pending[0]].arrival_s - elapsed)
                    elapsed = now() - t0
                count = 0
                while count < min(len(free), len(pending)) and served[pending[count]].arrival_s <= elapsed:
                    count += 1
            else:
                count = 0
            for _ in range(_admit_count(decide, count)):
                request, row = served[pending.popleft()], free.pop(0)
                request.slot, request.admit_s = row, now() - t0
                first = self._prefill(prompts[request.index], row)
                end_s = now() - t0  # the int() above waited for the prefill
                request.first_token_s = end_s
                steps.append(Step(PREFILL_STEP, end_s, {request.index: request.prompt_tokens}, request.prompt_tokens))
                if self._emit(request, first, end_s):
                    free.append(row)
                    free.sort()
                else:
                    active[row] = request
            if not active:
                continue
            self.decoder.advance(self.generator)
            self.column = (self.column + 1) % self.cache_len
            tokens = self.decoder.token.tolist()
            end_s = now() - t0
            steps.append(Step(DECODE_STEP, end_s, {r.index: 1 for r in active.values()}, self.max_slots))
            for row, request in list(active.items()):
                if self._emit(request, tokens[row], end_s):
                    del active[row]
                    free.append(row)
            free.sort()
        return ServeResult([served[r.index] for r in requests], steps)
