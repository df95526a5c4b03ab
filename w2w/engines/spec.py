"""What an engine supports and allocates, torch-free: the one home of each engine's rules (EngineSpec)."""

from __future__ import annotations

from dataclasses import dataclass

from w2w.cell import OFFLINE, SERVING

__all__ = ["OFFLINE", "SERVING", "EngineSpec"]


@dataclass(frozen=True)
class EngineSpec:
    """One engine's facts, read by the registry, config.validate, the planner and the engine itself.

    The login node reads these without torch: each engine's row is in w2w/engines/__init__.py
    (SPECS), and its Engine class points at that row (`spec`).
    """

    name: str  # engine=<name>; the module w2w/engines/<name>.py
    description: str
    decode_step: str  # the decode step's program, as the record names it (RankRecord.decode_step)
    grouped_query: bool = True  # runs models with n_kv_heads != n_heads
    rope_scaling: bool = True  # runs models with Llama 3.1 rope scaling
    # LLaMA-1's rule: run to min(max_seq_len, longest prompt + max_gen_len) whatever EOS says, so a
    # whole prompt needs only to leave one position. False: stop once every row has ended, and
    # prompt + max_gen_len must fit max_seq_len.
    runs_to_max_seq_len: bool = False
    # The engine holds a KV cache of its own (kept from cell to cell); False: it uses the model's
    # (setup_caches). A job with both kinds keeps both allocated.
    own_cache: bool = False
    # LLaMA-1's load: the cache is allocated at (the cell's batch size, model.max_seq_len), once per
    # cell, whatever the prompts; False: at the batch x (longest prompt + max_gen_len) it runs.
    cache_at_max_seq_len: bool = False
    cache_multiple: int = 1  # the cache length is rounded up to a multiple of this (capped at max_seq_len)
    scenarios: tuple[str, ...] = (OFFLINE,)
    refused_because: str = ""  # said where grouped-query attention or rope scaling is refused

    def prompt_room(self, max_seq_len: int, max_gen_len: int) -> int:
        """The longest whole prompt this engine runs within max_seq_len."""
        return max_seq_len - 1 if self.runs_to_max_seq_len else max_seq_len - max_gen_len

    def cache_len(self, length: int, max_seq_len: int) -> int:
        """Positions the cache allocates for `length` = longest prompt + max_gen_len: max_seq_len
        where the engine allocates at it (cache_at_max_seq_len); else capped at max_seq_len where
        the engine runs to it, then rounded up to cache_multiple (never past max_seq_len by rounding)."""
        if self.cache_at_max_seq_len:
            return max_seq_len
        if self.runs_to_max_seq_len:
            length = min(length, max_seq_len)
        return min(-(-length // self.cache_multiple) * self.cache_multiple, max(length, max_seq_len))

    def refusal(self, n_heads: int, kv_heads: int, rope_scaling_factor: float | None,
                others: list[str]) -> str | None:
        """Why this engine cannot run a model of these shapes, naming the option and the engines
        that can (`others`); None where it can."""
        why = f" ({self.refused_because})" if self.refused_because else ""
        use = f"use engine={' or '.join(others)}" if others else "use another model"
        if not self.grouped_query and kv_heads != n_heads:
            return (f"engine={self.name} has no grouped-query attention{why}: model.n_kv_heads={kv_heads} != "
                    f"n_heads={n_heads}; {use}")
        if not self.rope_scaling and rope_scaling_factor is not None:
            return (f"engine={self.name} has no rope scaling{why}: model.rope_scaling_factor={rope_scaling_factor}; "
                    f"{use}")
        return None

    def scenario_refusal(self, scenario: str, others: list[str]) -> str | None:
        """Why this engine cannot run `scenario`, naming the engines that can (`others`); None where it can."""
        if scenario in self.scenarios:
            return None
        return (f"engine={self.name} runs scenario={'|'.join(self.scenarios)} only (a static program: a batch "
                f"run to its end), not scenario={scenario}: use engine={' or '.join(others) or 'fast'}")
