"""The image tower: a ViT with a class token and learned position embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import VisionConfig
from .layers import PatchEmbed, Transformer, get_act_layer, resample_pos_embed

__all__ = ["VisionTower"]


class VisionTower(nn.Module):
    """Images (B, 3, H, W) -> embeddings (B, embed_dim).

    `forward_features` gives the normalised tokens (B, 1 + N, C) (class token first), `pool` the class
    token (B, C), `project` the embedding. Images of another size than `config.image_size` work: the
    position embeddings are resampled (bicubic) to the new patch grid.
    """

    def __init__(
        self,
        config: VisionConfig,
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
        self.patch_embed = PatchEmbed(config.patch_size, C, **dd)
        self.class_token = nn.Parameter(torch.zeros(C, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(config.num_patches + 1, C, **dd))
        self.norm_pre = nn.LayerNorm(C, eps=config.norm_eps, **dd)
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

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with the class token prepended and position embeddings added: (B, 1 + N, C)."""
        grid = self.patch_embed.grid(images)
        x = self.patch_embed(images.to(self.pos_embed.dtype))  # (B, N, C)
        cls = self.class_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + resample_pos_embed(self.pos_embed, grid)  # (B, 1 + N, C)
        return self.norm_pre(x)

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> normalised tokens (B, 1 + N, C), class token first."""
        return self.norm(self.transformer(self.embed(images)))

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Normalised tokens (B, 1 + N, C) and every block's attention probabilities (B, H, 1 + N, 1 + N)."""
        x, weights = self.transformer.forward_with_weights(self.embed(images))
        return self.norm(x), weights

    def pool(self, tokens: Tensor) -> Tensor:
        """The class token: (B, 1 + N, C) -> (B, C)."""
        return tokens[:, 0]

    def project(self, pooled: Tensor) -> Tensor:
        """Pooled features (B, C) -> embeddings (B, embed_dim), not normalised."""
        return self.proj(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> embeddings (B, embed_dim), not normalised."""
        return self.project(self.pool(self.forward_features(images)))

    def no_weight_decay(self) -> set[str]:
        """Names of the class token and position embeddings, which are excluded from weight decay."""
        return {"class_token", "pos_embed"}
