"""Model shapes without torch: what the login node needs to plan (parameter counts, bytes per value)."""

from __future__ import annotations

from dataclasses import dataclass, fields

# Bytes per value of each `precision=`; tests check these against torch's dtypes (w2w.model.DTYPES).
PRECISION_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def ffn_width(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's feed-forward width rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary scaling (rope_type llama3): long wavelengths slowed by `factor`."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_pos: int = 8192  # the context length the base frequencies were trained for


@dataclass(frozen=True)
class ModelArgs:
    """A LLaMA's shapes: the one home of these fields (the config schema's model section extends it)."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
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
        return ffn_width(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.kv_heads)
        ffn = 3 * self.dim * self.ffn_hidden
        return self.n_layers * (attn + ffn + 2 * self.dim) + 2 * self.vocab_size * self.dim + self.dim

    def shapes(self) -> ModelArgs:
        """These shapes alone, as a plain ModelArgs (a model config also carries run-only fields)."""
        return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})
