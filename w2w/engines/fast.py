"""Engine `fast`: one prefill of the left-padded prompts, then a static-shape decode step.

The prefill is one forward pass over the left-padded batch. Each decode step then has the same
shapes every time: it writes one token per row into the full-length KV cache at a slot held in a
device tensor, attends the whole cache under a validity mask kept on the device, and samples
without a host sync (greedy argmax, or top-p by an exponential race on noise drawn outside the
step). The step is the fused code of w2w/engines/fused.py (fused GEMMs, few elementwise operators,
GQA with no K/V copy). On CUDA it is captured once per (batch, cache length, greedy) as a CUDA
graph and replayed (temperature and top-p are device tensors the graph reads, so one graph serves
every setting); a capture that fails, before or midway, makes the whole engine eager from then on
(no capture is tried again for any shape: a capture that failed midway can leave CUDA's caching
allocator with a stale capture entry, and every retry would add one) and says why, once
(Engine.graph, in the record); on CPU (gloo) the same code runs eagerly, so CI exercises it. The host looks at the
tokens only every `eos_check_every` steps to stop once every row has ended; the steps run past an
EOS are real work and are counted, and tokens after an EOS are dropped.

The decoders and their graphs belong to the Engine instance, not the model: keep one engine for
every batch it serves, warm-up included, or each batch captures again. A graph holds the addresses
of the model's KV cache buffers, so when setup_caches reallocates them (the model's
cache_generation moves on) the engine drops every decoder and captures afresh.

Model parallel inside the graph: FairScale's layers call torch.distributed all_reduce/all_gather
on NCCL, which a graph captured by hand with torch.cuda.CUDAGraph records like any kernel
(capture_error_mode="thread_local", so NCCL's watchdog thread may query events meanwhile).
torch.compile(fullgraph=True) cannot trace FairScale's autograd.Function, and swapping the
collectives for functional ones would change the model code the paper's numbers ran through.
Hand capture was chosen without a GPU measurement; the fused step calls the collectives itself
(the same all_reduce), and the prefill still runs the model's own forward.
It follows no program of Meta's: its differences from Meta's Llama 2 code (main branch) are the
schedule above, the fused decode step, and the model arithmetic llama2 lists (w2w/engines/llama2.py);
Meta's programs are the engines llama1 and llama2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from w2w import distributed
from w2w.engines import SPECS, common
from w2w.engines.common import DECODE, PREFILL, Generation, PhaseClock, SamplingParams
from w2w.engines.fused import DecodeTimeout, FusedDecode
from w2w.model import Transformer

log = logging.getLogger("w2w.run")


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


def prefill(model: Transformer, batch: _Batch) -> torch.Tensor:
    width = batch.tokens.shape[1]
    logits = model(batch.tokens, 0, batch.positions, batch.key_valid[:, :width], last_only=True)
    return logits[:, -1]


def race_top_p(probs: torch.Tensor, p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling without a host sync: argmax of prob / Exp(1) noise draws each kept token
    with probability proportional to its mass (noise: (B, V) exponential draws)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > p
    choice = (sorted_probs.masked_fill(outside, 0.0) / noise).argmax(-1, keepdim=True)
    return order.gather(-1, choice).squeeze(-1)


# Records one call of a step and returns what replays it (a CUDA graph on GPUs); tests inject others.
Capture = Callable[[Callable[[], None]], Callable[[], None]]
# A decoder's view of its engine's capture: None where the engine no longer captures (it runs eagerly).
MaybeCapture = Callable[[Callable[[], None]], Callable[[], None] | None]


def cuda_capture(step: Callable[[], None]) -> Callable[[], None]:
    """A CUDA graph of step; capture_error_mode="thread_local" lets NCCL's watchdog query events meanwhile."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
    except BaseException:
        torch.cuda.set_stream(stream)  # a failed capture_end leaves graph()'s side stream current
        raise
    return graph.replay


def warm_up(step: Callable[[], None], device: torch.device) -> None:
    """The step before a capture runs on a side stream on CUDA (it warms cuBLAS and NCCL up)."""
    if device.type != "cuda":
        step()
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        step()
    current.wait_stream(side)


class StaticDecoder:
    """Device-resident state of the fast decode step for one (batch, cache length, greedy or not).

    Every buffer keeps its address for the decoder's lifetime, which is what lets a CUDA graph
    captured over step() be replayed for every later batch of that shape.
    """

    def __init__(self, fused: FusedDecode, batch: int, cache_len: int, greedy: bool,
                 capture: MaybeCapture | None = None):
        model = fused.model
        device, vocab = model.device, model.args.vocab_size
        self.model, self.fused, self.greedy, self.capture = model, fused, greedy, capture
        # The sampling settings the step reads, set per batch (set_sampling): not baked into a graph.
        self.temperature = torch.ones(1, device=device)
        self.top_p = torch.ones(1, device=device)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # cache slot of this step
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # rotary position per row
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # column of `out` to write
        # Additive attention mask (0 valid, -inf not): one fill per step, shared by every layer.
        self.mask = torch.zeros(batch, 1, 1, cache_len, dtype=model.norm.weight.dtype, device=device)
        self.out = torch.full((batch, cache_len), -1, dtype=torch.long, device=device)
        self.noise = None if greedy else torch.ones(batch, vocab, device=device)
        self.replay: Callable[[], None] | None = None  # the captured step, once captured
        self.tried = False  # a capture is tried once per decoder (and not at all once the engine's failed)

    def set_sampling(self, params: SamplingParams) -> None:
        """The batch's temperature and top-p, written where the (captured) step reads them."""
        if not self.greedy:
            self.temperature.fill_(params.temperature)
            self.top_p.fill_(params.top_p)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        return race_top_p(probs, self.top_p, self.noise)

    def draw(self, generator: torch.Generator) -> None:
        """Fresh noise for the next choice: outside the graph, as graphs replay a fixed RNG state."""
        if self.noise is not None:
            self.noise.exponential_(generator=generator)

    def start(self, batch: _Batch, first: torch.Tensor, width: int) -> None:
        self.token.copy_(first)
        self.slot.fill_(width)
        self.pos.copy_(batch.next_pos)
        self.mask.copy_(self.fused.mask(batch.key_valid, self.mask.dtype))
        self.out.fill_(-1)
        self.out[:, 0] = first
        self.col.fill_(1)

    def step(self) -> None:
        self.mask.index_fill_(3, self.slot, 0.0)
        token = self.choose(self.fused(self.token, self.slot, self.pos, self.mask))
        self.token.copy_(token)
        self.out.index_copy_(1, self.col, token[:, None])
        self.slot += 1
        self.pos += 1
        self.col += 1

    def advance(self, generator: torch.Generator) -> None:
        """One decode step: replay the capture, or run eagerly (and, the first time, capture the next)."""
        self.draw(generator)
        if self.replay is not None:
            self.replay()
            return
        if self.capture is None or self.tried:
            self.step()
            return
        warm_up(self.step, self.model.device)
        self.tried = True
        self.replay = self.capture(self.step)  # records the next step without running it; None: stays eager

    @property
    def graph(self) -> str:
        return "cuda graph" if self.replay is not None else "eager"

    def all_ended(self, eos_id: int, columns: int, deadline_s: float | None = None) -> bool:
        ended = (self.out[:, :columns] == eos_id).any(-1).all()
        self.settle(deadline_s)
        return bool(ended)

    def settle(self, deadline_s: float | None) -> None:
        """Wait for the queued steps, for at most deadline_s on CUDA (an EOS check, and the end of the decode)."""
        event = new_event(self.model.device)
        if deadline_s is not None and event is not None:
            wait_for(event, deadline_s)


def new_event(device: torch.device):
    """A CUDA event to wait on with a deadline; None off CUDA, where a collective times out on the host (gloo)."""
    return torch.cuda.Event() if device.type == "cuda" else None


def wait_for(event, deadline_s: float, poll_s: float = 1e-4) -> None:
    """Record `event` after the queued steps and wait for it at most deadline_s: a collective whose
    peer died never completes, and a plain host sync on it would block until SLURM kills the job.
    A short poll: the check comes every few steps of a few ms, and a late wake-up is lost time."""
    event.record()
    deadline = time.monotonic() + deadline_s
    while not event.query():
        if time.monotonic() > deadline:
            raise DecodeTimeout(f"Timed out: decode steps unfinished after {deadline_s:g} s (dist_timeout_s): "
                                "a model-parallel peer stopped answering, or its device hangs")
        time.sleep(poll_s)


class Engine(common.Engine):
    """The fast schedule; keeps one StaticDecoder (and its CUDA graph) per shape it has served."""

    spec = SPECS["fast"]  # cache slots a multiple of 64

    def __init__(self, model: Transformer, capture: Capture | None = None):
        super().__init__(model)
        self.fused = FusedDecode(model)
        self.capture = capture if capture is not None else (cuda_capture if model.device.type == "cuda" else None)
        self.decoders: dict[tuple, StaticDecoder] = {}
        self.capture_failed: str | None = None  # the first failure, after which nothing is captured
        self.decoders_built = 0  # a new shape costs a first eager step and a capture: warm-up should pay it
        self._cache_generation = model.cache_generation  # the KV cache the decoders point into

    @property
    def graph(self) -> str:
        """How the decode steps ran: "cuda graph", "eager", or the first "eager, capture failed: ..."."""
        if self.capture_failed is not None:
            return self.capture_failed
        return "cuda graph" if any(d.graph == "cuda graph" for d in self.decoders.values()) else "eager"

    @property
    def decode_path(self) -> str:
        graph = self.graph
        if graph != "eager":
            return graph  # "cuda graph", or "eager, capture failed: <why>"
        if self.capture is None:
            return f"eager (no CUDA graph on {self.model.device.type})"
        return "eager (no decode step has run yet)"

    def _capture(self, step: Callable[[], None]) -> Callable[[], None] | None:
        """The engine's capture of one decoder's step; None (eager) once any capture of this engine failed."""
        if self.capture_failed is not None or self.capture is None:
            return None
        try:
            return self.capture(step)
        except Exception as exc:  # whatever failed, the engine runs eagerly from now on, and says why once
            self.capture_failed = f"eager, capture failed: {type(exc).__name__}: {exc}"
            log.warning("fast: %s; this engine's decode steps run eagerly from now on, every shape", self.capture_failed)
            return None

    def decoder(self, batch: int, cache_len: int, params: SamplingParams,
                kind: type[StaticDecoder] | None = None) -> StaticDecoder:
        """The decoder (and graph) of this shape; kind: a StaticDecoder subclass (serving's ring step)."""
        if self.model.cache_generation != self._cache_generation:  # graphs over freed buffers: drop them
            self.decoders.clear()
            self._cache_generation = self.model.cache_generation
        kind = kind or StaticDecoder
        key = (batch, cache_len, params.greedy) + ((kind.__name__,) if kind is not StaticDecoder else ())
        if key not in self.decoders:
            capture = self._capture if self.capture is not None and self.capture_failed is None else None
            self.decoders[key] = kind(self.fused, batch, cache_len, params.greedy, capture)
            self.decoders_built += 1
        return self.decoders[key]

    def schedule(
        self, prompts: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int, cache_len: int,
        clock: PhaseClock, generator: torch.Generator,
    ) -> Generation:
        width = max(len(p) for p in prompts)
        batch = left_pad(prompts, pad_id, cache_len, self.model.device)
        decoder = self.decoder(len(prompts), cache_len, params)
        self.fused.wait_s = params.deadline_s
        decoder.set_sampling(params)
        clock.enter(PREFILL)
        decoder.draw(generator)
        decoder.start(batch, decoder.choose(prefill(self.model, batch)), width)
        clock.enter(DECODE)
        steps = 0
        while steps < params.max_gen_len - 1:
            check = not params.force_max_gen_len and steps % params.eos_check_every == 0
            if check and decoder.all_ended(eos_id, steps + 1, params.deadline_s):
                break
            try:
                decoder.advance(generator)
            except RuntimeError as exc:
                if not isinstance(exc, DecodeTimeout) and not distributed.is_collective_error(exc):
                    raise
                # A collective that timed out on the host (gloo): say which step, and what it means.
                raise DecodeTimeout(f"decode step {steps + 1}: a model-parallel peer stopped answering "
                                    f"({exc})") from exc
            steps += 1
        decoder.settle(params.deadline_s)  # the last steps (all of them when forced) under the same deadline
        clock.enter(None)
        rows = len(prompts)
        return Generation(decoder.out[:, : steps + 1].tolist(), sum(len(p) for p in prompts), steps,
                          positions=rows * width + steps * rows)
