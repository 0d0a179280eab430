"""The text tower: a Transformer over token ids (causal, as CLIP, or bidirectional, as SigLIP), pooled at one
position."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import TextConfig
from .layers import Transformer, get_act_layer
from .vision import make_projection

__all__ = ["TextTower"]


class TextTower(nn.Module):
    """Token ids (B, L) -> embeddings (B, embed_dim).

    Pooling follows `config.pool`: at the end-of-text token (the first `config.eot_id`, or with
    ``eot_id=None`` the highest id of each row, where CLIP's tokenizer puts it), at the last position or at
    the first. Under a causal mask nothing after the pooled position can change it, so a causal tower runs
    only the positions up to the batch's last pooled one: short prompts cost a fraction of the context
    length and give the same embeddings. A bidirectional tower (``causal=False``) runs every position it is
    given, since there padding changes the result.
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
            layer_scale=config.layer_scale,
            **dd,
        )
        self.norm = nn.LayerNorm(C, eps=config.norm_eps, **dd)
        self.proj = make_projection(config.proj, C, embed_dim, **dd)

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

    def pool_positions(self, text: Tensor) -> Tensor:
        """(B, L) ids -> (B,) the position each row is pooled at."""
        B, L = text.shape
        pool, eot = self.config.pool, self.config.eot_id
        if pool == "first" or L == 0:
            return torch.zeros(B, dtype=torch.long, device=text.device)
        if pool == "last":
            return torch.full((B,), L - 1, dtype=torch.long, device=text.device)
        # argmax returns the first of equal maxima: the first end-of-text token, as open_clip and transformers pool.
        return text.argmax(dim=-1) if eot is None else (text == eot).int().argmax(dim=-1)

    def embed(self, text: Tensor) -> Tensor:
        """Token plus position embeddings of the positions that matter: (B, L', C), L' <= L (L' = L for a
        bidirectional tower)."""
        self._check(text)
        if self.config.causal:
            n = int(self.pool_positions(text).max()) + 1 if text.numel() else 1
            text = text[:, :n]
        return self.token_embed(text) + self.pos_embed[: text.shape[1]]

    def forward_features(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> normalised tokens (B, L', C); L' is L for a bidirectional tower, else the
        batch's last pooled position + 1."""
        return self.norm(self.transformer(self.embed(text), is_causal=self.config.causal))

    def pool(self, tokens: Tensor, text: Tensor) -> Tensor:
        """The pooled token of each row: (B, L', C) -> (B, C)."""
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), self.pool_positions(text[:, : tokens.shape[1]])]

    def project(self, pooled: Tensor) -> Tensor:
        """Pooled features (B, C) -> embeddings (B, embed_dim), not normalised."""
        return self.proj(pooled)

    def forward(self, text: Tensor) -> Tensor:
        """Token ids (B, L) -> embeddings (B, embed_dim), not normalised; `project(pool(forward_features(text)))`,
        with the last block computing only the pooled position of each row."""
        x = self.embed(text)
        index = self.pool_positions(text[:, : x.shape[1]])[:, None]  # (B, 1)
        return self.project(self.norm(self.transformer.forward_queries(x, index, is_causal=self.config.causal))[:, 0])

    def no_weight_decay(self) -> set[str]:
        """Names of the embedding tables, which are excluded from weight decay."""
        return {"pos_embed", "token_embed.weight"}
