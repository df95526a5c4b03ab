"""The fast engine's decode step: one GEMM for Q, K, V and one for W1, W3, hand-fused elementwise work, GQA with no K/V copy."""

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


class DecodeTimeout(RuntimeError):
    """The decode steps did not finish in time: a model-parallel peer stopped answering."""


def fuse_rows(*linears: nn.Module) -> torch.Tensor:
    """One weight holding the linears' rows, which then become views of it: the model's own forward
    (Meta's layout, used by the other engines and the prefill) reads the same storage, so the fused
    GEMM costs no memory."""
    fused = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = fused[start:start + rows]
        start += rows
    return fused


@dataclass
class FusedLayer:
    wqkv: torch.Tensor  # (local q + k + v features, dim)
    w13: torch.Tensor  # (2 * local hidden, dim)
    wo: torch.Tensor  # (dim, local q features)
    w2: torch.Tensor  # (dim, local hidden)
    attn_norm: torch.Tensor  # RMSNorm weights times sqrt(dim) (see rms_norm)
    ffn_norm: torch.Tensor
    heads: int  # local query heads
    kv_heads: int  # local key/value heads


class FusedDecode:
    """The decode step of `fast` over a model's weights; the model's KV cache and rope table are used in place."""

    def __init__(self, model: Transformer):
        self.model = model
        self.world = fs_init.get_model_parallel_world_size()
        self.group = fs_init.get_model_parallel_group() if self.world > 1 else None
        # Only one rank adds the residual before the all-reduce, so the sum holds it once.
        self.add_residual = self.world == 1 or fs_init.get_model_parallel_rank() == 0
        dim = model.args.dim
        # sqrt(sum x^2 + eps * dim) = sqrt(dim) * sqrt(mean x^2 + eps): one hypot of the vector norm.
        self.eps_root = torch.tensor(math.sqrt(model.args.norm_eps * dim), device=model.device)
        with torch.no_grad():
            self.layers = [self._fuse(layer, dim) for layer in model.layers]
        self._cis: torch.Tensor | None = None
        self.wait_s: float | None = None  # host-side limit on a collective (the cell's dist_timeout_s)

    @staticmethod
    def _fuse(layer: nn.Module, dim: int) -> FusedLayer:
        attn, ffn = layer.attention, layer.feed_forward
        return FusedLayer(
            wqkv=fuse_rows(attn.wq, attn.wk, attn.wv), w13=fuse_rows(ffn.w1, ffn.w3),
            wo=attn.wo.weight, w2=ffn.w2.weight,
            attn_norm=layer.attention_norm.weight * math.sqrt(dim), ffn_norm=layer.ffn_norm.weight * math.sqrt(dim),
            heads=attn.local_heads, kv_heads=attn.local_kv_heads,
        )

    def cis(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, head_dim / 2) complex rotations of the rows' positions (one gather per step)."""
        if self._cis is None or self._cis.device != self.model.rope.device:
            self._cis = torch.view_as_complex(self.model.rope.contiguous())
        return self._cis[positions][:, None]

    def mask(self, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Additive (B, 1, 1, cache_len) mask: 0 where a key is valid, -inf elsewhere. A float mask
        is what SDPA uses as is; a boolean one is converted in every layer."""
        bias = torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device)
        return bias.masked_fill_(~key_valid, float("-inf"))[:, None, None]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Meta's RMSNorm in four operators (about ten as written): weight carries sqrt(dim)."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        return x / torch.hypot(norm, self.eps_root).to(x.dtype) * weight

    def rope(self, qk: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
        """Rotate (B, heads, D) interleaved pairs by one complex multiply (in fp32, as Meta does)."""
        pairs = qk.float().reshape(*qk.shape[:-1], -1, 2)
        return torch.view_as_real(torch.view_as_complex(pairs) * cis).flatten(-2).to(qk.dtype)

    def attention(self, h: torch.Tensor, layer: FusedLayer, cache, slot, cis, mask) -> torch.Tensor:
        bsz, hd = h.shape[0], self.model.args.head_dim
        qkv = F.linear(self.rms_norm(h, layer.attn_norm), layer.wqkv)
        qk_cols = (layer.heads + layer.kv_heads) * hd
        rotated = self.rope(qkv[:, :qk_cols].view(bsz, -1, hd), cis)
        k = rotated[:, layer.heads:, None]  # (B, KV, 1, D)
        v = qkv[:, qk_cols:].view(bsz, layer.kv_heads, 1, hd)
        keys, values = cache.k[:bsz], cache.v[:bsz]
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        # Grouped-query decode with no K/V copy: the group's query heads are the query positions
        # of their shared K/V head, an ordinary attention over the un-repeated cache.
        q = rotated[:, : layer.heads].view(bsz, layer.kv_heads, -1, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
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
        gate, up = F.linear(self.rms_norm(h, layer.ffn_norm), layer.w13).chunk(2, dim=-1)
        return self.project(h, F.silu(gate) * up, layer.w2)

    def __call__(self, token: torch.Tensor, slot: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one token per row written at cache slot `slot`; mask from mask()."""
        h = self.model.tok_embeddings(token)
        cis = self.cis(positions)
        for layer, block in zip(self.layers, self.model.layers, strict=True):
            h = self.attention(h, layer, block.attention.cache, slot, cis, mask)
            h = self.feed_forward(h, layer)
        return self.model.output(self.model.norm(h)).float()
