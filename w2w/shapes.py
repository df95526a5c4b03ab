"""Model shapes without torch: what the login node needs to plan (parameter counts, bytes per value)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Bytes per value of each `precision=`; tests check these against torch's dtypes (w2w.model.DTYPES).
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary scaling (rope_type llama3): long wavelengths slowed by `factor`."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_pos: int = 8192  # the context length the base frequencies were trained for


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Llama 3.1 rope scaling; None: plain rotary embeddings (LLaMA 1, 2, 3).
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192

    @property
    def rope_scaling(self) -> RopeScaling | None:
        if self.rope_scaling_factor is None:
            return None
        return RopeScaling(self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_max_pos)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        ffn = 3 * self.dim * self.ffn_hidden
        return self.n_layers * (attn + ffn + 2 * self.dim) + 2 * self.vocab_size * self.dim + self.dim


ARG_FIELDS = tuple(f.name for f in fields(ModelArgs))


def preset_args(model: Any) -> ModelArgs:
    """The shapes a model config states (a preset, or model=checkpoint once read)."""
    return ModelArgs(**{k: model[k] for k in ARG_FIELDS})
