"""LLaMA on FairScale model-parallel layers, device-agnostic, with a KV cache held as buffers."""

from __future__ import annotations

import hashlib
import math

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn

from w2w.shapes import ModelArgs, RopeScaling

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _keep(weight: torch.Tensor) -> torch.Tensor:
    # Weights come from a checkpoint or a seeded state dict; skip FairScale's random init.
    return weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def scale_rope(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Meta's apply_scaling (Llama 3.1): keep short wavelengths, divide long ones by the factor,
    interpolate smoothly in between."""
    low_wavelen = scaling.original_max_pos / scaling.low_freq_factor
    high_wavelen = scaling.original_max_pos / scaling.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (scaling.original_max_pos / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    medium = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / scaling.factor, medium))


def rope_tables(head_dim: int, max_pos: int, theta: float, device: torch.device,
                scaling: RopeScaling | None = None) -> torch.Tensor:
    """(max_pos, head_dim // 2, 2) cos/sin table in fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        freqs = scale_rope(freqs, scaling)
    angles = torch.outer(torch.arange(max_pos, device=device).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D) with Meta's interleaved pairs; table: (B, S, D/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0].unsqueeze(2), table[..., 1].unsqueeze(2)
    rotated = torch.stack(
        [pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1
    )
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated (batch, heads, max_len, head_dim); a smaller batch uses its first rows."""

    def __init__(self, batch: int, max_len: int, heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        # Keys and values in one buffer (kv[0], kv[1]), each laid out as on its own: the fast step
        # writes both in one operator.
        self.register_buffer("kv", torch.zeros((2, *shape), dtype=dtype, device=device), persistent=False)
        self.k, self.v = self.kv[0], self.kv[1]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write at slots start.. (a Python int) and return the filled prefix: shapes grow per step."""
        bsz, end = k.shape[0], start + k.shape[2]
        self.k[:bsz, :, start:end] = k
        self.v[:bsz, :, start:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]

    def write(self, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one step at slot (a (1,) device tensor) and return the whole cache: static shapes."""
        keys, values = self.k[: k.shape[0]], self.v[: k.shape[0]]
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        return keys, values


# enable_gqa exists from torch 2.5; older torch repeats K/V instead (same numbers, more memory).
SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D), each head repeated in place as Meta does."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, meta: bool) -> torch.Tensor:
    """Attention over (B, H, S, D); mask is boolean, True where a query may see a key.

    meta: Meta's reference arithmetic (K/V repeated for GQA, explicit matmul, fp32 softmax);
    otherwise one fused scaled_dot_product_attention call.
    """
    n_rep = q.shape[1] // keys.shape[1]
    if meta:
        keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), values)
    if n_rep > 1 and SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    keys, values = repeat_kv(keys, n_rep), repeat_kv(values, n_rep)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = fs_init.get_model_parallel_world_size()
        self.local_heads = args.n_heads // world
        self.local_kv_heads = args.kv_heads // world
        self.head_dim = args.head_dim
        hd = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * hd, bias=False, gather_output=False, init_method=_keep)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * hd, bias=False, gather_output=False, init_method=_keep)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * hd, bias=False, gather_output=False, init_method=_keep)
        self.wo = RowParallelLinear(args.n_heads * hd, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, start: int, rope: torch.Tensor, mask: torch.Tensor,
        slot: torch.Tensor | None = None, meta: bool = False,
    ) -> torch.Tensor:
        """slot: write at this device position and attend the whole cache (static decode step)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        # (B, H, S, D) for attention; the cache holds every position written so far.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if slot is None:
            keys, values = self.cache.update(start, k, v)
        else:
            keys, values = self.cache.write(slot, k, v)
        out = attend(q, keys, values, mask, meta)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)
        self.w2 = RowParallelLinear(hidden, args.dim, bias=False, input_is_parallel=True, init_method=_keep)
        self.w3 = ColumnParallelLinear(args.dim, hidden, bias=False, gather_output=False, init_method=_keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start, rope, mask, slot=None, meta=False):
        h = x + self.attention(self.attention_norm(x), start, rope, mask, slot, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Parameter names match Meta's consolidated.NN.pth checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = ParallelEmbedding(args.vocab_size, args.dim, init_method=_keep)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ColumnParallelLinear(args.dim, args.vocab_size, bias=False, init_method=_keep)
        self.rope: torch.Tensor | None = None
        # Counts KV cache allocations: anything captured over the cache's buffers (the fast
        # engine's CUDA graphs) is stale once this moves on.
        self.cache_generation = 0

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate the KV cache for a batch shape; a no-op if a cache of that length and at least
        that batch is allocated (a smaller last batch uses its first rows)."""
        first = self.layers[0].attention.cache
        if first is not None and first.k.shape[0] >= batch and first.k.shape[2] == max_len:
            return
        if max_len > self.args.max_seq_len:
            raise ValueError(
                f"prompt + max_gen_len = {max_len} tokens exceeds model.max_seq_len={self.args.max_seq_len}"
            )
        dtype, device = self.norm.weight.dtype, self.device
        self.cache_generation += 1
        for layer in self.layers:
            attn = layer.attention
            attn.cache = None  # free the old cache before allocating the new one
            attn.cache = KVCache(batch, max_len, attn.local_kv_heads, attn.head_dim, dtype, device)
        if self.rope is None or self.rope.device != device:
            self.rope = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device,
                                    self.args.rope_scaling)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, start: int, positions: torch.Tensor, key_valid: torch.Tensor,
        last_only: bool = False, meta: bool = False,
    ) -> torch.Tensor:
        """Logits of shape (B, S, vocab) for tokens (B, S) written at cache slots start..start+S.

        last_only: logits of the last position only (B, 1, vocab): all that sampling needs, and
        the vocabulary projection of a whole prompt batch is a large share of the prefill.
        positions (B, S): rotary position of each token (left padding shifts them per row).
        key_valid (B, start+S): False for padding slots, which no query may attend to.
        meta: Meta's reference attention arithmetic (see attend).
        """
        seqlen = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        rope = self.rope[positions]
        slots = torch.arange(start + seqlen, device=tokens.device)
        query_slots = start + torch.arange(seqlen, device=tokens.device)
        causal = slots[None, :] <= query_slots[:, None]
        # A padding query attends to itself only: a row with no key would give NaN, and NaN
        # values leak through zero attention weights into later layers.
        itself = slots[None, :] == query_slots[:, None]
        mask = ((causal[None] & key_valid[:, None, :]) | itself[None]).unsqueeze(1)  # (B, 1, S, start+S)
        for layer in self.layers:
            h = layer(h, start, rope, mask, meta=meta)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    @torch.inference_mode()
    def decode_step(
        self, token: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, vocab) of one token per row written at cache slot `slot`, a (1,) tensor.

        Every tensor keeps its shape from step to step and no position is a Python int, so the
        step can be captured once as a CUDA graph. key_valid (B, cache_len) must already be True
        at `slot`; it is the whole mask, since slots after it are still False.
        """
        h = self.tok_embeddings(token[:, None])
        rope = self.rope[positions[:, None]]
        mask = key_valid[:, None, None, :]
        for layer in self.layers:
            h = layer(h, 0, rope, mask, slot=slot)
        return self.output(self.norm(h))[:, -1].float()


def build_model(args: ModelArgs, state_dict: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Transformer:
    """Build the local shard in `dtype`, load its slice of the weights, move it to `device`."""
    # FairScale allocates with the legacy torch.Tensor constructor, which follows the default
    # dtype but ignores device contexts: build in the target dtype on the host, then move.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()


# How each parameter is split across model-parallel ranks: the dimension cut, or None (replicated).
def shard_dim(name: str) -> int | None:
    if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")):
        return 0  # column-parallel: output features
    if name.endswith(("wo.weight", "w2.weight")):
        return 1  # row-parallel: input features
    if name.endswith("tok_embeddings.weight"):
        return 1  # ParallelEmbedding splits the model dimension
    return None


def shard_slice(full: torch.Tensor, name: str, rank: int, world: int) -> torch.Tensor:
    dim = shard_dim(name)
    if dim is None:
        return full
    size = full.shape[dim]
    if size % world:
        raise ValueError(f"{name}: dimension {dim} of size {size} does not split into {world} shards")
    return full.narrow(dim, rank * size // world, size // world)


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every parameter, in Meta's naming."""
    hd, kv = args.head_dim, args.kv_heads
    shapes: dict[str, tuple[int, ...]] = {
        "tok_embeddings.weight": (args.vocab_size, args.dim),
        "norm.weight": (args.dim,),
        "output.weight": (args.vocab_size, args.dim),
    }
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (args.n_heads * hd, args.dim),
            p + "attention.wk.weight": (kv * hd, args.dim),
            p + "attention.wv.weight": (kv * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.ffn_hidden, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.ffn_hidden),
            p + "feed_forward.w3.weight": (args.ffn_hidden, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        }
    return shapes


def random_full_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded per name, so every rank and world size sees the same full model."""
    name_hash = int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")
    gen = torch.Generator().manual_seed(seed * 2**48 + name_hash)
    if len(shape) == 1:
        return torch.ones(shape) + 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


def random_state_dict(args: ModelArgs, seed: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's slice of a random model that is the same at every world size."""
    return {
        name: shard_slice(random_full_tensor(name, shape, seed), name, rank, world).contiguous()
        for name, shape in parameter_shapes(args).items()
    }
