"""Batched generation, engine `fast`: one prefill of the left-padded prompts, then static-shape decode.

The prefill is one forward pass over the left-padded batch. Each decode step then has the same
shapes every time: it writes one token per row into the full-length KV cache at a slot held in a
device tensor, attends the whole cache under a validity mask kept on the device, and samples
without a host sync (greedy argmax, or top-p by an exponential race on noise drawn outside the
step). On CUDA the step is captured once per (batch, cache length, sampling) as a CUDA graph and
replayed; on CPU (gloo) the same code runs eagerly, so CI exercises it. The host looks at the
tokens only every `eos_check_every` steps to stop once every row has ended; the steps run past an
EOS are real work and are counted, and tokens after an EOS are dropped.

Model parallel inside the graph: FairScale's layers call torch.distributed all_reduce/all_gather
on NCCL, which a graph captured by hand with torch.cuda.CUDAGraph records like any kernel
(capture_error_mode="thread_local", so NCCL's watchdog thread may query events meanwhile).
torch.compile(fullgraph=True) cannot trace FairScale's autograd.Function, and swapping the
collectives for functional ones would change the model code the paper's numbers ran through.
Hand capture keeps one model code path for both engines; it was chosen without a GPU measurement.
Meta's reference schedule is the `reference` engine, in w2w/reference.py.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from w2w.config import ENGINES
from w2w.model import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_gen_len: int
    temperature: float = 0.8
    top_p: float = 0.95
    greedy: bool = False
    force_max_gen_len: bool = False  # ignore EOS: exactly max_gen_len new tokens per prompt
    seed: int = 1
    eos_check_every: int = 1  # fast engine: decode steps between host checks for the end


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


def race_top_p(probs: torch.Tensor, p: float, noise: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling without a host sync: argmax of prob / Exp(1) noise draws each kept token
    with probability proportional to its mass (noise: (B, V) exponential draws)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > p
    choice = (sorted_probs.masked_fill(outside, 0.0) / noise).argmax(-1, keepdim=True)
    return order.gather(-1, choice).squeeze(-1)


class StaticDecoder:
    """Device-resident state of the fast decode step for one (batch, cache length, sampling).

    Every buffer keeps its address for the decoder's lifetime, which is what lets a CUDA graph
    captured over step() be replayed for every later batch of that shape.
    """

    def __init__(self, model: Transformer, batch: int, cache_len: int, params: SamplingParams):
        device, vocab = model.device, model.args.vocab_size
        self.model, self.params = model, params
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # cache slot of this step
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # rotary position per row
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # column of `out` to write
        self.key_valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)
        self.out = torch.full((batch, cache_len), -1, dtype=torch.long, device=device)
        self.noise = None if params.greedy else torch.ones(batch, vocab, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.params.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        return race_top_p(probs, self.params.top_p, self.noise)

    def draw(self, generator: torch.Generator) -> None:
        """Fresh noise for the next choice: outside the graph, as graphs replay a fixed RNG state."""
        if self.noise is not None:
            self.noise.exponential_(generator=generator)

    def start(self, batch: _Batch, first: torch.Tensor, width: int) -> None:
        self.token.copy_(first)
        self.slot.fill_(width)
        self.pos.copy_(batch.next_pos)
        self.key_valid.copy_(batch.key_valid)
        self.out.fill_(-1)
        self.out[:, 0] = first
        self.col.fill_(1)

    def step(self) -> None:
        self.key_valid.index_fill_(1, self.slot, True)
        token = self.choose(self.model.decode_step(self.token, self.slot, self.pos, self.key_valid))
        self.token.copy_(token)
        self.out.index_copy_(1, self.col, token[:, None])
        self.slot += 1
        self.pos += 1
        self.col += 1

    def advance(self, generator: torch.Generator) -> None:
        """One decode step: replay the graph, or run eagerly (and capture after the first on CUDA)."""
        self.draw(generator)
        if self.graph is not None:
            self.graph.replay()
            return
        if self.model.device.type != "cuda":
            self.step()
            return
        # The first step runs eagerly on a side stream (it warms cuBLAS and NCCL up), then the
        # capture records the next one without running it.
        current = torch.cuda.current_stream(self.model.device)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.step()
        self.graph = graph

    def all_ended(self, eos_id: int, columns: int) -> bool:
        return bool((self.out[:, :columns] == eos_id).any(-1).all())


def _decoder(model: Transformer, batch: int, cache_len: int, params: SamplingParams) -> StaticDecoder:
    key = ("fast", batch, cache_len, params.greedy, params.temperature, params.top_p)
    if key not in model.decoders:
        model.decoders[key] = StaticDecoder(model, batch, cache_len, params)
    return model.decoders[key]


def _generate_fast(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int,
    cache_len: int, clock: PhaseClock, generator: torch.Generator,
) -> Generation:
    width = max(len(p) for p in prompts)
    batch = left_pad(prompts, pad_id, cache_len, model.device)
    decoder = _decoder(model, len(prompts), cache_len, params)
    clock.enter("prefill")
    decoder.draw(generator)
    decoder.start(batch, decoder.choose(prefill(model, batch)), width)
    clock.enter("decode")
    steps = 0
    while steps < params.max_gen_len - 1:
        check = not params.force_max_gen_len and steps % params.eos_check_every == 0
        if check and decoder.all_ended(eos_id, steps + 1):
            break
        decoder.advance(generator)
        steps += 1
    clock.enter(None)
    return Generation(decoder.out[:, : steps + 1].tolist(), sum(len(p) for p in prompts), steps)


def cut_at_eos(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def generate(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    cache_len: int | None = None,
    clock: PhaseClock | None = None,
    engine: str = "fast",
) -> Generation:
    """Generate for a batch of tokenized prompts with `engine` (fast or reference).

    cache_len: KV cache length to allocate (default: longest prompt + max_gen_len); pass the
    same value for every batch of a cell so the cache is allocated once.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine}: valid are {', '.join(ENGINES)}")
    if params.eos_check_every < 1:
        raise ValueError(f"eos_check_every={params.eos_check_every}: must be >= 1")
    width = max(len(p) for p in prompts)
    cache_len = cache_len or width + params.max_gen_len
    if width + params.max_gen_len > cache_len:
        raise ValueError(f"prompt of {width} tokens + max_gen_len={params.max_gen_len} exceeds cache_len={cache_len}")
    device = model.device
    model.setup_caches(len(prompts), cache_len)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    clock = clock or PhaseClock(device)
    with torch.inference_mode():
        if engine == "reference":
            from w2w.reference import generate_reference  # it builds on this module's sampling

            gen = generate_reference(model, prompts, params, eos_id, pad_id, clock, generator)
        else:
            gen = _generate_fast(model, prompts, params, eos_id, pad_id, cache_len, clock, generator)
    if not params.force_max_gen_len:
        gen.tokens = cut_at_eos(gen.tokens, eos_id)
    return gen
