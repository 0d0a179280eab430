"""A stack of blocks, shared by the image tower and (with a causal mask) the text tower."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .block import Block

__all__ = ["Transformer"]


class Transformer(nn.Module):
    """`depth` blocks of `width` channels; optional gradient checkpointing per block."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        norm_eps: float = 1e-5,
        block_layer: Callable[..., nn.Module] = Block,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        block_kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=norm_eps))
        self.width = width
        self.blocks = nn.ModuleList(
            block_layer(width, num_heads, mlp_ratio, device=device, dtype=dtype, **block_kwargs) for _ in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """(B, N, C) -> (B, N, C)."""
        for block in self.blocks:
            x = self._run(block, x, attn_mask, is_causal)
        return x

    def forward_queries(self, x: Tensor, index: Tensor, is_causal: bool = False) -> Tensor:
        """The output at the positions `index` (B, M) only: (B, N, C) -> (B, M, C), equal to
        ``forward(x).gather(...)``. The last block computes those rows and nothing else (`Block.forward_queries`):
        a tower pooled at one token per row skips most of one block's work."""
        for block in self.blocks[:-1]:
            x = self._run(block, x, None, is_causal)
        last = self.blocks[-1]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(last.forward_queries, x, index, is_causal, use_reentrant=False)
        return last.forward_queries(x, index, is_causal)

    def _run(self, block: nn.Module, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward_with_weights(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Runs the stack without checkpointing and returns every block's attention (B, H, N, N)."""
        weights = []
        for block in self.blocks:
            x, w = block.forward_with_weights(x, attn_mask=attn_mask, is_causal=is_causal)
            weights.append(w)
        return x, weights

    def set_fused_attention(self, enable: bool = True) -> None:
        """True: every attention uses `scaled_dot_product_attention`; False: the explicit-softmax reference
        path. Mutates the modules in place."""
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = enable
