"""The text tower: a causal Transformer pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .layers import Transformer, get_act_layer

__all__ = ["TextTower"]


class TextTower(nn.Module):
    """Token ids (B, L) -> embeddings (B, embed_dim).

    The end-of-text token must carry the highest id in each row (true of the CLIP tokenizer), which is
    where the text is pooled. Only the first `max(eot position) + 1` positions are run: under the causal
    mask nothing after the end-of-text token can change it, so short prompts cost a fraction of the
    context length and give the same embeddings.
    """

    def __init__(
        self,
        config: TextConfig,
        embed_dim: int,
        *,
        transformer: Transformer | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        C = config.width
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, C, **dd)
        self.pos_embed = nn.Parameter(torch.zeros(config.context_length, C, **dd))
        self.transformer = transformer or Transformer(
            C,
            config.depth,
            config.num_heads,
            config.mlp_ratio,
            norm_eps=config.norm_eps,
            act_layer=get_act_layer(config.activation),
            **dd,
        )
        self.norm = nn.LayerNorm(C, eps=config.norm_eps, **dd)
        self.proj = nn.Linear(C, embed_dim, bias=False, **dd)

    def _check(self, text: Tensor) -> None:
        if text.ndim != 2 or text.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"expected token ids of shape (B, L) and an integer dtype, got {tuple(text.shape)} {text.dtype}; "
                "tokenize strings with vlm.get_tokenizer(model)"
            )
        if text.shape[1] > self.config.context_length:
            raise ValueError(
                f"token ids have {text.shape[1]} positions but the model's context_length is "
                f"{self.config.context_length}; tokenize with vlm.get_tokenizer(model)"
            )

    def embed(self, text: Tensor) -> Tensor:
        """Token plus position embeddings of the positions that matter: (B, L', C), L' <= L."""
        self._check(text)
        n = int(text.argmax(dim=-1).max()) + 1 if text.numel() else 1
        text = text[:, :n]
        return self.token_embed(text) + self.pos_embed[:n]

    def forward_features(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> normalised tokens (B, L', C), L' = the batch's last end-of-text position + 1."""
        return self.norm(self.transformer(self.embed(text), is_causal=True))

    def pool(self, tokens: Tensor, text: Tensor) -> Tensor:
        """The end-of-text token of each row: (B, L', C) -> (B, C)."""
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), text.argmax(dim=-1)]

    def project(self, pooled: Tensor) -> Tensor:
        """Pooled features (B, C) -> embeddings (B, embed_dim), not normalised."""
        return self.proj(pooled)

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> embeddings (B, embed_dim), not normalised."""
        return self.project(self.pool(self.forward_features(text), text))

    def no_weight_decay(self) -> set[str]:
        """Names of the embedding tables, which are excluded from weight decay."""
        return {"pos_embed", "token_embed.weight"}
