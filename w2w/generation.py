"""Batched generation: one prefill of the left-padded prompts, then one token per decode step."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from w2w.model import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_gen_len: int
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    force_max_gen_len: bool = False  # ignore EOS: exactly max_gen_len new tokens per prompt
    seed: int = 1


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, EOS and anything after it dropped
    prompt_tokens: int  # real (unpadded) prompt tokens in the batch
    decode_steps: int  # forward passes after the prefill


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Device-synchronized phase boundaries; on_boundary(previous, next) lets energy windows follow."""

    def __init__(self, device: torch.device, on_boundary: Callable[[str | None, str | None], None] | None = None):
        self.device = device
        self.on_boundary = on_boundary
        self.seconds: dict[str, float] = defaultdict(float)
        self._phase: str | None = None
        self._since = 0.0

    def enter(self, phase: str | None) -> None:
        """Close the current phase and open `phase` (None: just close)."""
        synchronize(self.device)
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] += now - self._since
        if self.on_boundary is not None:
            self.on_boundary(self._phase, phase)
        self._phase, self._since = phase, now


@dataclass
class _Batch:
    tokens: torch.Tensor  # (B, P) left-padded prompts
    positions: torch.Tensor  # (B, P) rotary positions, 0 at each row's first real token
    key_valid: torch.Tensor  # (B, cache_len) False on padding slots
    next_pos: torch.Tensor = field(init=False)  # (B,) position of the next token

    def __post_init__(self):
        self.next_pos = self.positions[:, -1] + 1


def left_pad(prompts: list[list[int]], pad_id: int, cache_len: int, device: torch.device) -> _Batch:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), cache_len), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt)
        real[row, width - len(prompt):width] = True
    positions = (real[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    return _Batch(tokens.to(device), positions.to(device), real.to(device))


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Nucleus sampling as in Meta's reference: keep the smallest set with mass >= p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> tokens (B,). Logits are identical on every rank, and so is the generator."""
    if params.greedy:
        return logits.argmax(-1)
    return sample_top_p(torch.softmax(logits / params.temperature, dim=-1), params.top_p, generator)


def prefill(model: Transformer, batch: _Batch) -> torch.Tensor:
    width = batch.tokens.shape[1]
    logits = model(batch.tokens, 0, batch.positions, batch.key_valid[:, :width], last_only=True)
    return logits[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, slot: int, batch: _Batch) -> torch.Tensor:
    batch.key_valid[:, slot] = True
    logits = model(token[:, None], slot, batch.next_pos[:, None], batch.key_valid[:, : slot + 1])
    batch.next_pos += 1
    return logits[:, -1]


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    cache_len: int | None = None,
    clock: PhaseClock | None = None,
) -> Generation:
    """Generate for a batch of tokenized prompts; stops once every sequence has ended.

    cache_len: KV cache length to allocate (default: longest prompt + max_gen_len); pass the
    same value for every batch of a cell so the cache is allocated once.
    """
    width = max(len(p) for p in prompts)
    cache_len = cache_len or width + params.max_gen_len
    if width + params.max_gen_len > cache_len:
        raise ValueError(f"prompt of {width} tokens + max_gen_len={params.max_gen_len} exceeds cache_len={cache_len}")
    device = model.device
    model.setup_caches(len(prompts), cache_len)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    batch = left_pad(prompts, pad_id, cache_len, device)
    clock = clock or PhaseClock(device)

    clock.enter("prefill")
    token = next_token(prefill(model, batch), params, generator)
    clock.enter("decode")
    steps = [token]
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for slot in range(width, width + params.max_gen_len - 1):
        if not params.force_max_gen_len:
            ended |= token == eos_id
            if bool(ended.all()):
                break
        token = next_token(decode_one_token(model, token, slot, batch), params, generator)
        steps.append(token)
    clock.enter(None)

    out = torch.stack(steps, dim=1).tolist()
    if not params.force_max_gen_len:
        out = [row[: row.index(eos_id)] if eos_id in row else row for row in out]
    return Generation(out, sum(len(p) for p in prompts), len(steps) - 1)
