"""Multi-head self-attention with q/k/v as separate `nn.Linear` modules (LoRA adapters can target them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "causal_mask"]


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """Boolean (n, n) mask, True where a query may attend (the key is not in its future)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class Attention(nn.Module):
    """Self-attention over (B, N, C) tokens.

    The fused path calls `scaled_dot_product_attention`; the reference path (``fused = False``) spells
    out softmax(q k^T / sqrt(d)) v and is what `forward_with_weights` uses to hand back the attention
    probabilities for visualisation.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert width % num_heads == 0, "the config validates width % num_heads"
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q_proj = nn.Linear(width, width, bias=qkv_bias, **dd)
        self.k_proj = nn.Linear(width, width, bias=qkv_bias, **dd)
        self.v_proj = nn.Linear(width, width, bias=qkv_bias, **dd)
        self.out_proj = nn.Linear(width, width, **dd)
        self.fused = True
        # Concatenated projection weights reused while no gradient is recorded (see `_fused_weights`).
        self._fused_cache: dict[int, tuple] = {}

    def _heads(self, x: Tensor, proj: nn.Linear) -> Tensor:
        B, N, _ = x.shape
        return proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def _merge(self, x: Tensor) -> Tensor:
        B, H, N, Dh = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(B, N, H * Dh))  # (B, N, C)

    def _fused_weights(self, projs: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
        """The projections' weights (and biases) stacked. Without autograd (inference, evaluation) the stack is
        kept and reused until a weight changes (its version or storage), rather than copied again on every
        call: that copy was 4% of a ViT-B/16's inference time. The cost is one more copy of these weights."""
        tensors = [p.weight for p in projs] + ([p.bias for p in projs] if projs[0].bias is not None else [])
        if torch.is_grad_enabled():
            return torch.cat(tensors[: len(projs)]), torch.cat(tensors[len(projs) :]) if len(tensors) > len(projs) else None
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        cached = self._fused_cache.get(len(projs))
        if cached is None or cached[0] != key:
            weight = torch.cat(tensors[: len(projs)])
            bias = torch.cat(tensors[len(projs) :]) if len(tensors) > len(projs) else None
            cached = self._fused_cache[len(projs)] = (key, weight, bias)
        return cached[1], cached[2]

    def _fused_heads(self, x: Tensor, projs: tuple[nn.Module, ...]) -> tuple[Tensor, ...]:
        if not all(type(p) is nn.Linear for p in projs):
            # An adapter (LoRA, ...) replaced a projection: call each module so the adapter runs.
            return tuple(self._heads(x, p) for p in projs)
        # One GEMM instead of several: the same numbers, better use of the matrix unit.
        weight, bias = self._fused_weights(projs)
        B, N, _ = x.shape
        out = F.linear(x, weight, bias).view(B, N, len(projs), self.num_heads, self.head_dim)
        return out.permute(2, 0, 3, 1, 4).unbind(0)  # len(projs) x (B, H, N, Dh)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._fused_heads(x, (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """(B, N, C) -> (B, N, C). `attn_mask`: boolean (True = attend) or additive float, broadcastable
        to (B, H, N, N); `is_causal` adds the causal mask."""
        q, k, v = self._qkv(x)
        if not self.fused:
            return self._merge(_reference_attention(q, k, v, attn_mask, is_causal)[0])
        if is_causal and attn_mask is not None:
            attn_mask, is_causal = _combine_causal(attn_mask, x.shape[1], q.dtype), False
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))

    def forward_with_weights(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Like `forward`, also returning the attention probabilities (B, H, N, N) (differentiable)."""
        q, k, v = self._qkv(x)
        out, weights = _reference_attention(q, k, v, attn_mask, is_causal)
        return self._merge(out), weights

    def attend(self, x: Tensor, context: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Queries from `x` (B, M, C), keys and values from `context` (B, N, C) -> (B, M, C); `attn_mask` as in
        `forward`, broadcastable to (B, H, M, N)."""
        q = self._heads(x, self.q_proj)
        k, v = self._fused_heads(context, (self.k_proj, self.v_proj))
        if not self.fused:
            return self._merge(_reference_attention(q, k, v, attn_mask, False)[0])
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


def _combine_causal(attn_mask: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    causal = causal_mask(n, attn_mask.device)
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask + torch.zeros(n, n, dtype=dtype, device=attn_mask.device).masked_fill(~causal, float("-inf"))


def _reference_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> tuple[Tensor, Tensor]:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    return weights @ v, weights  # (B, H, N, Dh), (B, H, N, N)
