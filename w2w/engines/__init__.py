"""The engine registry: each generation engine's name and spec (torch-free), and how to build one over a model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from w2w.engines.spec import OFFLINE, SERVING, EngineSpec

if TYPE_CHECKING:  # common imports torch, which the login node must not load to validate engine=
    from w2w.engines.common import Engine
    from w2w.model import Transformer

# One module w2w/engines/<name>.py per entry, each defining `Engine(model)` whose `spec` is its row here:
# the one home of the engine's rules, which config.validate, launch/plan.py and the engine read.
SPECS: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec(
        name="fast",
        description="left-padded prefill, then a static-shape decode step (a CUDA graph on GPUs)",
        decode_step="fused: F.rms_norm with its gain, one QKV and one W1/W3 GEMM, in-place RoPE, one cache write",
        cache_multiple=64,  # aligned rows for the attention kernels, and fewer distinct graphs
        scenarios=(OFFLINE, SERVING),  # serving: continuous batching (w2w/engines/serving.py)
    ),
    EngineSpec(
        name="llama1",
        description="the paper's program: Meta's LLaMA-1 code (llama_v1), schedule, arithmetic and cache layout",
        decode_step="LLaMA-1's forward (llama_v1 llama/model.py)",
        grouped_query=False, rope_scaling=False, refused_because="LLaMA-1 had none",
        runs_to_max_seq_len=True, own_cache=True, cache_at_max_seq_len=True,
    ),
    EngineSpec(
        name="llama2",
        description="Meta's Llama 2 llama/generation.py schedule (main branch)",
        decode_step="the model's forward (meta=True)",
    ),
)}
ENGINES: dict[str, str] = {name: spec.description for name, spec in SPECS.items()}

# Names no longer in the registry, and what to write instead.
RENAMED_TO: dict[str, str] = {"reference": "llama2"}  # older records' names, and the engine they ran
RENAMED: dict[str, str] = {
    "reference": "engine=reference was renamed llama2 (Meta's Llama 2 code); the paper's program is llama1",
}


def check_name(name: str) -> None:
    """Raise ValueError naming the valid engines (and the new name of a renamed one)."""
    if name in RENAMED:
        raise ValueError(f"{RENAMED[name]}: valid are {', '.join(ENGINES)}")
    if name not in ENGINES:
        raise ValueError(f"engine={name}: valid are {', '.join(ENGINES)}")


def prompt_room(name: str, max_seq_len: int, max_gen_len: int) -> int:
    """The longest whole prompt engine `name` runs within max_seq_len."""
    return SPECS[name].prompt_room(max_seq_len, max_gen_len)


def refusal(name: str, n_heads: int, kv_heads: int, rope_scaling_factor: float | None) -> str | None:
    """Why engine `name` cannot run a model of these shapes, naming the engines that can; None where it can."""
    others = [o for o, spec in SPECS.items() if o != name and spec.refusal(n_heads, kv_heads, rope_scaling_factor, []) is None]
    return SPECS[name].refusal(n_heads, kv_heads, rope_scaling_factor, others)


def scenario_refusal(name: str, scenario: str) -> str | None:
    """Why engine `name` cannot run `scenario`, naming the engines that can; None where it can."""
    others = [o for o, spec in SPECS.items() if scenario in spec.scenarios]
    return SPECS[name].scenario_refusal(scenario, others)


def create(name: str, model: Transformer) -> Engine:
    """The engine `name` over `model`; keep it for every batch it serves (fast keeps its graphs, llama1 its cache)."""
    check_name(name)
    return importlib.import_module(f"w2w.engines.{name}").Engine(model)


def create_serving(names: list[str], model: Transformer) -> dict[str, Engine]:
    """One engine per name over one model (a job's). Each engine's program is its own: none changes
    the model's weights, so a cell runs the same step whichever cells share its job."""
    return {name: create(name, model) for name in dict.fromkeys(names)}
