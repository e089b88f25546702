"""Prunable multi-head attention.

open_clip's blocks use ``nn.MultiheadAttention``, whose packed ``in_proj_weight`` hides heads from torch-pruning.
:class:`PrunableAttention` keeps the same maths with a ``qkv`` ``nn.Linear`` and an output ``proj`` ``nn.Linear``
around ``scaled_dot_product_attention``, so widths and heads can be pruned and the result exports cleanly to ONNX.
It accepts the call signature open_clip's ``ResidualAttentionBlock.attention`` uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrunableAttention(nn.Module):
    """Self-attention with ``num_heads`` heads of ``head_dim`` channels each (``num_heads * head_dim`` may differ
    from the residual width ``dim`` after pruning)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dropout = attn_dropout
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> PrunableAttention:
        """Build from an ``nn.MultiheadAttention`` (batch_first, self-attention) with identical outputs."""
        if not mha.batch_first:
            raise ValueError("only batch_first nn.MultiheadAttention can be converted")
        module = cls(mha.embed_dim, mha.num_heads, mha.head_dim, attn_dropout=float(mha.dropout))
        with torch.no_grad():
            module.qkv.weight.copy_(mha.in_proj_weight)
            module.qkv.bias.copy_(mha.in_proj_bias)
            module.proj.weight.copy_(mha.out_proj.weight)
            module.proj.bias.copy_(mha.out_proj.bias)
        return module.to(mha.in_proj_weight.dtype)

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x):
            raise NotImplementedError("PrunableAttention supports self-attention only")
        b, n, _ = q_x.shape
        qkv = self.qkv(q_x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # unbind (not indexing): torch-pruning maps qkv channels to heads through it
        drop = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out), None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, attn_dropout={self.attn_dropout}"
