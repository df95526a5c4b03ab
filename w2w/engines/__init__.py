"""The engine registry: each generation engine's name, its description, and how to build one over a model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # common imports torch, which the login node must not load to validate engine=
    from w2w.engines.common import Engine
    from w2w.model import Transformer

# One module w2w/engines/<name>.py per entry, each defining `Engine(model)`.
ENGINES: dict[str, str] = {
    "fast": "left-padded prefill, then a static-shape decode step (a CUDA graph on GPUs)",
    "llama1": "the paper's program: Meta's LLaMA-1 code (llama_v1), schedule, arithmetic and cache layout",
    "llama2": "Meta's Llama 2 llama/generation.py schedule (main branch)",
}
# Engines that, as Meta's LLaMA-1 code, run to min(max_seq_len, longest prompt + max_gen_len): a whole
# prompt needs only to leave one position in max_seq_len, and its row may return fewer than max_gen_len
# tokens. The others need prompt + max_gen_len to fit.
RUN_TO_MAX_SEQ_LEN = frozenset({"llama1"})


def prompt_room(name: str, max_seq_len: int, max_gen_len: int) -> int:
    """The longest whole prompt engine `name` runs within max_seq_len."""
    return max_seq_len - 1 if name in RUN_TO_MAX_SEQ_LEN else max_seq_len - max_gen_len


# Names no longer in the registry, and what to write instead.
RENAMED: dict[str, str] = {
    "reference": "engine=reference was renamed llama2 (Meta's Llama 2 code); the paper's program is llama1",
}


def check_name(name: str) -> None:
    """Raise ValueError naming the valid engines (and the new name of a renamed one)."""
    if name in RENAMED:
        raise ValueError(f"{RENAMED[name]}: valid are {', '.join(ENGINES)}")
    if name not in ENGINES:
        raise ValueError(f"engine={name}: valid are {', '.join(ENGINES)}")


def create(name: str, model: Transformer) -> Engine:
    """The engine `name` over `model`; keep it for every batch it serves (fast keeps its graphs, llama1 its cache)."""
    check_name(name)
    return importlib.import_module(f"w2w.engines.{name}").Engine(model)


def create_serving(names: list[str], model: Transformer) -> dict[str, Engine]:
    """One engine per name over one model (a job's). Where fast alone serves it, the RMSNorm gains are
    first folded into the GEMMs that read them (the same function, two operators fewer per layer in
    fast's step); next to llama1 or llama2 the model keeps Meta's weights, which they replicate."""
    names = list(dict.fromkeys(names))
    if names == ["fast"]:
        from w2w.engines.fused import fold_norm_gains

        fold_norm_gains(model)
    return {name: create(name, model) for name in names}
