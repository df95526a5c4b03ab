"""The fast engine's decode step: one GEMM for Q, K, V and one for W1, W3, one operator per RMSNorm, GQA with no K/V copy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from w2w.model import Transformer

# Columns the decode step's residual rows carry past the model dimension: the first holds
# sqrt(norm_eps * dim), so a row's plain L2 norm is RMSNorm's sqrt(dim * (mean x^2 + eps)); the
# rest are zeros that keep rows 16-byte aligned for the GEMMs.
TAIL = 8


class DecodeTimeout(RuntimeError):
    """The decode steps did not finish in time: a model-parallel peer stopped answering."""


def fuse_rows(*linears: nn.Module, pad: int = 0) -> torch.Tensor:
    """One weight holding the linears' rows (and `pad` zero rows), which then become views of it:
    the model's own forward (Meta's layout, used by the other engines and the prefill) reads the
    same storage, so the fused GEMM costs no memory."""
    first = linears[0].weight
    zeros = first.new_zeros(pad, first.shape[1])
    fused = torch.cat([*(linear.weight.detach() for linear in linears), zeros])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start:start + rows]
        start += rows
    return fused


@torch.no_grad()
def fold_norm_gains(model: Transformer) -> None:
    """Multiply each layer's RMSNorm weights into the GEMMs that read its output (W diag(g)) and set
    them to 1: the model computes the same function (up to one rounding of each weight), and the
    fast step skips the gain multiply. Only for a model that fast alone serves: the engines that
    replicate Meta's code must see Meta's weights."""
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        for norm, linears in ((layer.attention_norm, (attn.wq, attn.wk, attn.wv)), (layer.ffn_norm, (ffn.w1, ffn.w3))):
            for linear in linears:
                linear.weight.mul_(norm.weight)
            norm.weight.fill_(1.0)


@dataclass
class FusedLayer:
    wqkv: torch.Tensor  # (local q + k + v features, dim)
    w13: torch.Tensor  # (2 * local hidden, dim)
    wo: torch.Tensor  # (dim + TAIL, local q features): zero rows keep the residual's tail
    w2: torch.Tensor  # (dim + TAIL, local hidden)
    attn_gain: torch.Tensor | None  # the RMSNorm weights, None where folded into the GEMMs (all 1)
    ffn_gain: torch.Tensor | None
    heads: int  # local query heads
    kv_heads: int  # local key/value heads


def _gain(norm: nn.Module) -> torch.Tensor | None:
    return None if bool((norm.weight == 1).all()) else norm.weight


class FusedDecode:
    """The decode step of `fast` over a model's weights; the model's KV cache and rope table are used in place.

    Operators per layer: RMSNorm 1 (2 with unfolded gains), the QKV GEMM, RoPE 2, the K/V cache
    write 1, attention 1, the output GEMM with the residual add, RMSNorm 1 (2), the W1/W3 GEMM,
    SiLU, the product, and the W2 GEMM with the residual add: 12 (14).
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.world = fs_init.get_model_parallel_world_size()
        self.group = fs_init.get_model_parallel_group() if self.world > 1 else None
        # Only one rank adds the residual before the all-reduce, so the sum holds it once.
        self.add_residual = self.world == 1 or fs_init.get_model_parallel_rank() == 0
        dim = model.args.dim
        self.sqrt_dim = math.sqrt(dim)  # RMSNorm's mean is the norm over sqrt(dim): the GEMM's alpha
        self.tail = torch.zeros(TAIL, dtype=model.norm.weight.dtype, device=model.device)
        self.tail[0] = math.sqrt(model.args.norm_eps * dim)
        self.zero = torch.zeros((), dtype=self.tail.dtype, device=model.device)  # addmm's ignored input
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in model.layers]
        self._rotations: torch.Tensor | None = None
        self._ones: dict[int, torch.Tensor] = {}  # weight_norm's per-row gain, one buffer per batch size
        self.wait_s: float | None = None  # host-side limit on a collective (the cell's dist_timeout_s)

    @staticmethod
    def _fuse(layer: nn.Module) -> FusedLayer:
        attn, ffn = layer.attention, layer.feed_forward
        return FusedLayer(
            wqkv=fuse_rows(attn.wq, attn.wk, attn.wv), w13=fuse_rows(ffn.w1, ffn.w3),
            wo=fuse_rows(attn.wo, pad=TAIL), w2=fuse_rows(ffn.w2, pad=TAIL),
            attn_gain=_gain(layer.attention_norm), ffn_gain=_gain(layer.ffn_norm),
            heads=attn.local_heads, kv_heads=attn.local_kv_heads,
        )

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, head_dim / 2, 2, 2) fp32 rotation matrices [[cos, -sin], [sin, cos]] of the rows'
        positions (one gather per step)."""
        rope = self.model.rope
        if self._rotations is None or self._rotations.device != rope.device:
            cos, sin = rope[..., 0], rope[..., 1]
            self._rotations = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        return self._rotations[positions][:, None]

    def mask(self, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, 1, cache_len) mask: 0 where a key is valid, -inf elsewhere. A float mask
        is what SDPA uses as is; a boolean one is converted in every layer."""
        bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
        return bias.masked_fill_(~key_valid, float("-inf"))[:, None, None]

    def rms_norm(self, h: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        """RMSNorm up to its sqrt(dim) factor (the next GEMM's alpha), in one fused operator:
        weight_norm divides each row by its L2 norm, and the tail column puts eps in that norm.
        It computes in fp32 and rounds once, as Meta's does before its gain multiply."""
        ones = self._ones.get(h.shape[0])
        if ones is None:
            ones = self._ones[h.shape[0]] = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
        normed = torch._weight_norm(h, ones, 0)[:, : h.shape[1] - TAIL]
        return normed if gain is None else normed * gain

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T * sqrt(dim): the GEMM after an RMSNorm (alpha is exact, a scaled gain would round)."""
        return torch.addmm(self.zero, x, weight.t(), beta=0, alpha=self.sqrt_dim)

    def rope(self, pairs: torch.Tensor, rotations: torch.Tensor) -> None:
        """Rotate (B, heads, D / 2, 2) interleaved pairs in place, in fp32 as Meta does and with its
        arithmetic (x0 cos - x1 sin, x1 cos + x0 sin): the products, then their sums written back."""
        terms = pairs[..., None, :] * rotations  # (B, heads, D / 2, 2 out, 2 in), fp32
        torch.add(terms[..., 0], terms[..., 1], out=pairs)

    def attention(self, h: torch.Tensor, layer: FusedLayer, cache, slot, rotations, mask) -> torch.Tensor:
        bsz, hd = h.shape[0], self.model.args.head_dim
        qkv = self.linear(self.rms_norm(h, layer.attn_gain), layer.wqkv)
        q_cols, qk_cols = layer.heads * hd, (layer.heads + layer.kv_heads) * hd
        self.rope(qkv[:, :qk_cols].view(bsz, -1, hd // 2, 2), rotations)
        # K and V sit side by side in qkv and in the cache (kv[0] keys, kv[1] values): one write.
        kv = cache.kv[:, :bsz]
        kv.index_copy_(3, slot, qkv[:, q_cols:].view(bsz, 2, layer.kv_heads, 1, hd).transpose(0, 1))
        # Grouped-query decode with no K/V copy: the group's query heads are the query positions
        # of their shared K/V head, an ordinary attention over the un-repeated cache.
        q = qkv[:, :q_cols].view(bsz, layer.kv_heads, -1, hd)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.project(h, out.reshape(bsz, -1), layer.wo)

    def project(self, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h + x @ weight.T with the residual add in the GEMM, then the row-parallel all-reduce."""
        out = torch.addmm(h, x, weight.t()) if self.add_residual else torch.mm(x, weight.t())
        if self.group is not None:
            self.all_reduce(out)
        return out

    def all_reduce(self, out: torch.Tensor) -> None:
        """The model-parallel sum, waited on for at most wait_s on the host where it blocks there
        (gloo): FairScale's group has the default 30-minute timeout, not the cell's."""
        if self.wait_s is None or out.is_cuda:  # on CUDA it is queued (and captured): the EOS check's deadline guards it
            dist.all_reduce(out, group=self.group)
            return
        work = dist.all_reduce(out, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.wait_s))
        except RuntimeError as exc:
            raise DecodeTimeout(f"Timed out: all-reduce unanswered after {self.wait_s:g} s (dist_timeout_s): {exc}") from exc

    def feed_forward(self, h: torch.Tensor, layer: FusedLayer) -> torch.Tensor:
        gate, up = self.linear(self.rms_norm(h, layer.ffn_gain), layer.w13).chunk(2, dim=-1)
        return self.project(h, F.silu(gate) * up, layer.w2)

    def __call__(self, token: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one token per row written at cache slot `slot`; mask from mask()."""
        embedded = self.model.tok_embeddings(token)
        # The residual rows with their tail (B, dim + TAIL): the output GEMMs' zero rows keep it.
        h = torch.cat([embedded, self.tail.expand(embedded.shape[0], TAIL)], dim=-1)
        rotations = self.rotations(positions)
        for layer, block in zip(self.layers, self.model.layers, strict=True):
            h = self.attention(h, layer, block.attention.cache, slot, rotations, mask)
            h = self.feed_forward(h, layer)
        return self.model.output(self.model.norm(h[:, :-TAIL])).float()
