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
    "reference": "Meta's llama/generation.py schedule, as the paper's numbers ran it",
}


def create(name: str, model: Transformer) -> Engine:
    """The engine `name` over `model`; keep it for every batch it serves (fast keeps its graphs)."""
    if name not in ENGINES:
        raise ValueError(f"engine={name}: valid are {', '.join(ENGINES)}")
    return importlib.import_module(f"w2w.engines.{name}").Engine(model)
