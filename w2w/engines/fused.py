"""The fast engine's decode step: one GEMM for Q, K, V and one for W1, W3, F.rms_norm, GQA with no K/V copy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from w2w.model import Transformer


class DecodeTimeout(RuntimeError):
    """The decode steps did not finish in time: a model-parallel peer stopped answering."""


def fuse_rows(*linears: nn.Module) -> torch.Tensor:
    """One weight holding the linears' rows, which then become views of it: the model's own forward
    (Meta's layout, used by the other engines and the prefill) reads the same storage, so the fused
    GEMM costs no memory and the values are the model's own."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start:start + rows]
        start += rows
    return fused


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with its gain: x / sqrt(mean(x^2) + eps) * gain, public F.rms_norm (one fused kernel
    on CUDA in current torch); torch < 2.4 has none, so there its arithmetic in fp32, rounded once."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), gain, eps)
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain).type_as(x)


@dataclass
class FusedLayer:
    wqkv: torch.Tensor  # (local q + k + v features, dim)
    w13: torch.Tensor  # (2 * local hidden, dim)
    wo: torch.Tensor  # (dim, local q features)
    w2: torch.Tensor  # (dim, local hidden)
    attn_gain: torch.Tensor  # the RMSNorm weights, the model's own
    ffn_gain: torch.Tensor
    heads: int  # local query heads
    kv_heads: int  # local key/value heads


class FusedDecode:
    """The decode step of `fast` over a model's weights; the model's KV cache and rope table are used in place.

    Kernels per layer on CUDA: RMSNorm 1, the QKV GEMM, RoPE 2, the K/V cache write 1, attention 1,
    the output GEMM with the residual add (a copy and a GEMM), RMSNorm 1, the W1/W3 GEMM, SiLU, the
    product, and the W2 GEMM with the residual add (2): 14. The weights are the model's, untouched,
    so every cell of fast runs this same step whichever engines share its job.
    """

    def __init__(self, model: Transformer):
        self.model = model
        self.world = fs_init.get_model_parallel_world_size()
        self.group = fs_init.get_model_parallel_group() if self.world > 1 else None
        # Only one rank adds the residual before the all-reduce, so the sum holds it once.
        self.add_residual = self.world == 1 or fs_init.get_model_parallel_rank() == 0
        self.eps = model.args.norm_eps
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in model.layers]
        self._rotations: torch.Tensor | None = None
        self.wait_s: float | None = None  # host-side limit on a collective (the cell's dist_timeout_s)

    @staticmethod
    def _fuse(layer: nn.Module) -> FusedLayer:
        attn, ffn = layer.attention, layer.feed_forward
        return FusedLayer(
            wqkv=fuse_rows(attn.wq, attn.wk, attn.wv), w13=fuse_rows(ffn.w1, ffn.w3),
            wo=attn.wo.weight, w2=ffn.w2.weight,
            attn_gain=layer.attention_norm.weight, ffn_gain=layer.ffn_norm.weight,
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

    def rope(self, pairs: torch.Tensor, rotations: torch.Tensor) -> None:
        """Rotate (B, heads, D / 2, 2) interleaved pairs in place, in fp32 as Meta does and with its
        arithmetic (x0 cos - x1 sin, x1 cos + x0 sin): the products, then their sums written back."""
        terms = pairs[..., None, :] * rotations  # (B, heads, D / 2, 2 out, 2 in), fp32
        torch.add(terms[..., 0], terms[..., 1], out=pairs)

    def attention(self, h: torch.Tensor, layer: FusedLayer, cache, slot, rotations, mask) -> torch.Tensor:
        bsz, hd = h.shape[0], self.model.args.head_dim
        qkv = torch.mm(rms_norm(h, layer.attn_gain, self.eps), layer.wqkv.t())
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
        gate, up = torch.mm(rms_norm(h, layer.ffn_gain, self.eps), layer.w13.t()).chunk(2, dim=-1)
        return self.project(h, F.silu(gate) * up, layer.w2)

    def __call__(self, token: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one token per row written at cache slot `slot`; mask from mask()."""
        h = self.model.tok_embeddings(token)  # the residual rows (B, dim)
        rotations = self.rotations(positions)
        for layer, block in zip(self.layers, self.model.layers, strict=True):
            h = self.attention(h, layer, block.attention.cache, slot, rotations, mask)
            h = self.feed_forward(h, layer)
        return self.model.output(self.model.norm(h)).float()
