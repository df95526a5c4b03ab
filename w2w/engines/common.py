"""What every engine shares: sampling parameters, the result, phase timing, sampling, and the set-up around a schedule."""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from w2w.cell import Cell
from w2w.engines import refusal
from w2w.engines.spec import EngineSpec
from w2w.model import Transformer

# The phases an engine's PhaseClock enters; energy windows and the runner's times use these names.
PREFILL = "prefill"
DECODE = "decode"
PHASES = (PREFILL, DECODE)


@dataclass(frozen=True)
class SamplingParams:
    max_gen_len: int
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    force_max_gen_len: bool = False  # ignore EOS: exactly max_gen_len new tokens per prompt
    seed: int = 1
    eos_check_every: int = 1  # fast engine: decode steps between host checks for the end
    deadline_s: float | None = None  # fast engine: host-side wait for the steps at an EOS check (dist_timeout_s)

    @classmethod
    def of(cls, cell: Cell, max_gen_len: int | None = None) -> SamplingParams:
        """A cell's sampling settings; max_gen_len overrides the cell's (a warm-up runs fewer tokens)."""
        return cls(
            max_gen_len=max_gen_len or cell.max_gen_len,
            temperature=cell.temperature,
            top_p=cell.top_p,
            greedy=cell.greedy,
            force_max_gen_len=cell.force_max_gen_len,
            seed=cell.seed,
            eos_check_every=cell.eos_check_every,
            deadline_s=float(cell.dist_timeout_s),
        )


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, EOS and anything after it dropped
    prompt_tokens: int  # real (unpadded) prompt tokens in the batch
    decode_steps: int  # forward passes after the prefill
    # positions computed: the rows of every forward call (sum over calls of batch x positions in the call),
    # prompt rows and rows past EOS included
    positions: int
    # How each response ended (ENDINGS), set by Engine.generate from the rows before the EOS cut.
    ended_by: list[str] = field(default_factory=list)


# How a response ends: its EOS token, max_gen_len new tokens, or the engine's max_seq_len (LLaMA-1 runs a
# batch to min(max_seq_len, longest prompt + max_gen_len): a row can be cut before either).
EOS, MAX_GEN_LEN, MAX_SEQ_LEN = "eos", "max_gen_len", "max_seq_len"
ENDINGS = (EOS, MAX_GEN_LEN, MAX_SEQ_LEN)


def endings(rows: list[list[int]], eos_id: int, params: SamplingParams) -> list[str]:
    """How each of the rows (before the EOS cut) ended: with force_max_gen_len EOS ends nothing."""
    def one(row: list[int]) -> str:
        if not params.force_max_gen_len and eos_id in row:
            return EOS
        return MAX_GEN_LEN if len(row) >= params.max_gen_len else MAX_SEQ_LEN
    return [one(row) for row in rows]


@dataclass(frozen=True)
class KvCache:
    """A KV cache as allocated on one rank: one tensor's shape (K and V of each layer alike) and the
    bytes of all of them."""

    shape: tuple[int, ...]  # in the holder's layout: llama1 (B, S, H, D) as Meta's, the model's (B, H, S, D)
    bytes: int  # every layer's K and V on this rank

    @classmethod
    def of(cls, shape: tuple[int, ...], element_bytes: int, tensors: int) -> KvCache:
        return cls(shape, tensors * element_bytes * math.prod(shape))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Device-synchronized phase boundaries; on_boundary(previous, next) lets energy windows follow."""

    def __init__(self, device: torch.device, on_boundary: Callable[[str | None, str | None], None] | None = None):
        self.device = device
        self.on_boundary = on_boundary
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._phase: str | None = None
        self._since = 0.0

    def enter(self, phase: str | None) -> None:
        """Close the current phase and open `phase` (None: just close)."""
        if phase is not None and phase not in PHASES:  # a misspelt phase would time nothing, silently
            raise ValueError(f"phase {phase!r}: valid are {', '.join(PHASES)} or None")
        synchronize(self.device)
        now = time.perf_counter()
        if self._phase is not None:
            self.seconds[self._phase] += now - self._since
        if self.on_boundary is not None:
            self.on_boundary(self._phase, phase)
        self._phase, self._since = phase, now


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


def cut_at_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def right_pad(prompts: list[list[int]], pad_id: int, total_len: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, total_len) right-padded, prompt mask (B, total_len) True on prompt tokens): Meta's layout."""
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long)
    is_prompt = torch.zeros((len(prompts), total_len), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
        is_prompt[row, : len(prompt)] = True
    return tokens.to(device), is_prompt.to(device)


def check_lengths(prompts: list[list[int]], params: SamplingParams, cache_len: int | None,
                  cap: int | None = None) -> int:
    """The cache length to allocate (default: longest prompt + max_gen_len), after checking the arguments.
    cap: LLaMA-1's rule, run to min(cap, longest prompt + max_gen_len); a prompt must leave one position."""
    if params.eos_check_every < 1:
        raise ValueError(f"eos_check_every={params.eos_check_every}: must be >= 1")
    width = max(len(p) for p in prompts)
    cache_len = cache_len or width + params.max_gen_len
    if cap is not None:
        cache_len = min(cache_len, cap)
        if width >= cache_len:
            raise ValueError(f"prompt of {width} tokens leaves no position to generate in {cache_len}")
        return cache_len
    if width + params.max_gen_len > cache_len:
        raise ValueError(f"prompt of {width} tokens + max_gen_len={params.max_gen_len} exceeds cache_len={cache_len}")
    return cache_len


def new_generator(device: torch.device, seed: int) -> torch.Generator:
    """A sampling stream on `device` seeded with `seed` (every rank seeds alike and draws alike)."""
    return torch.Generator(device=device).manual_seed(seed)


class Engine(ABC):
    """A generation schedule over one model. generate() does what every engine needs around its
    loop; a subclass (one module per engine, named in the registry) supplies only schedule(), and
    points `spec` at its registry row (w2w.engines.SPECS), whose rules generate() applies."""

    spec: EngineSpec

    def __init__(self, model: Transformer):
        args = model.args
        problem = refusal(self.spec.name, args.n_heads, args.kv_heads, args.rope_scaling_factor)
        if problem:
            raise ValueError(problem)
        self.model = model

    def prepare(self, batch: int, cache_len: int) -> None:
        """Make the KV cache ready for a batch; default: the model's cache (llama1 keeps its own)."""
        self.model.setup_caches(batch, cache_len)

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        eos_id: int,
        pad_id: int,
        cache_len: int | None = None,
        clock: PhaseClock | None = None,
        generator: torch.Generator | None = None,
        cache_batch: int | None = None,
    ) -> Generation:
        """Generate for a batch of tokenized prompts.

        cache_len: KV cache length to allocate (default: longest prompt + max_gen_len); pass the
        same value for every batch of a cell so the cache is allocated once.
        cache_batch: the cell's batch size, at which an engine that allocates at load
        (EngineSpec.cache_at_max_seq_len: LLaMA-1's max_batch_size) sizes its cache; None: this batch's.
        generator: the sampling stream, on the model's device, drawn from and left advanced (a cell
        passes one stream to all its batches, as Meta seeds once per process); None: a fresh one
        seeded with params.seed, for this batch alone.
        """
        max_seq_len = self.model.args.max_seq_len
        cache_len = check_lengths(prompts, params, cache_len, max_seq_len if self.spec.runs_to_max_seq_len else None)
        cache_len = self.spec.cache_len(cache_len, max_seq_len)
        rows = max(len(prompts), cache_batch or 0) if self.spec.cache_at_max_seq_len else len(prompts)
        self.prepare(rows, cache_len)
        if generator is None:
            generator = new_generator(self.model.device, params.seed)
        clock = clock or PhaseClock(self.model.device)
        with torch.inference_mode():
            gen = self.schedule(prompts, params, eos_id, pad_id, cache_len, clock, generator)
        gen.ended_by = endings(gen.tokens, eos_id, params)
        if not params.force_max_gen_len:
            gen.tokens = cut_at_eos(gen.tokens, eos_id)
        return gen

    @property
    def decode_step(self) -> str:
        """The decode step's program, as the record names it."""
        return self.spec.decode_step

    @property
    def kv_cache(self) -> KvCache | None:
        """The KV cache allocated now on this rank (the model's; llama1 its own); None before any."""
        cache = self.model.layers[0].attention.cache
        if cache is None:
            return None
        return KvCache.of(tuple(cache.k.shape), cache.k.element_size(), 2 * len(self.model.layers))

    @property
    def graph(self) -> str | None:
        """How the decode steps ran, for engines that capture them (fast); None for the others."""
        return None

    @property
    def decode_path(self) -> str:
        """The decode path for a report: "cuda graph", or eager and why."""
        return "eager (a Python loop over the model's forward: this engine captures nothing)"

    @abstractmethod
    def schedule(
        self, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int, cache_len: int,
        clock: PhaseClock, generator: torch.Generator,
    ) -> Generation:
        """The engine's own loop, inside inference mode over an allocated cache: clock.enter(PREFILL),
        then clock.enter(DECODE), then clock.enter(None)."""
