"""The image tower: a ViT over patch tokens (with or without a class token) and learned position embeddings."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .config import VisionConfig
from .layers import AttentionPool, PatchEmbed, Transformer, drop_patches, get_act_layer, resample_pos_embed

__all__ = ["VisionTower", "make_projection"]


def make_projection(kind: str, width: int, embed_dim: int, **dd) -> nn.Module:
    """A tower's projection into the shared space for a config's `proj`: "linear", "linear_bias" or "none"."""
    if kind == "none":
        return nn.Identity()
    return nn.Linear(width, embed_dim, bias=kind == "linear_bias", **dd)


class VisionTower(nn.Module):
    """Images (B, 3, H, W) -> embeddings (B, embed_dim).

    `forward_features` gives the tokens (B, P + N, C) after the final LayerNorm (P = 1 prefix class token,
    or 0), `pool` one vector per image (B, C) (the class token, the mean of the patch tokens, or SigLIP's
    attention pooling; with `norm_after_pool` the LayerNorm applies here instead), `project` the embedding.
    Images of another size than `config.image_size` work: the position embeddings are resampled to the new
    patch grid.
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
        norm_layer = partial(nn.LayerNorm, eps=config.norm_eps)
        self.config = config
        # Where patch dropout draws its masks; None: torch's global generator (as open_clip). A trainer sets
        # one it seeds per step, so that a resumed run draws the masks the uninterrupted run drew.
        self.patch_dropout_generator: torch.Generator | None = None
        self.patch_embed = PatchEmbed(config.patch_size, C, bias=config.patch_bias, **dd)
        self.class_token = nn.Parameter(torch.zeros(C, **dd)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(config.num_prefix_tokens + config.num_patches, C, **dd))
        self.norm_pre = norm_layer(C, **dd) if config.norm_pre else nn.Identity()
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
        self.norm = norm_layer(C, **dd)
        if config.pool == "map":
            self.attn_pool = AttentionPool(
                C, config.num_heads, config.mlp_ratio, act_layer=get_act_layer(config.activation), norm_layer=norm_layer, **dd
            )
        else:
            self.attn_pool = None
        self.proj = make_projection(config.proj, C, embed_dim, **dd)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens, after the class token (if any) and position embeddings: (B, P + N, C); in training
        mode with `config.patch_dropout`, a random `patches_kept(N, patch_dropout)` of the N per image."""
        grid = self.patch_embed.grid(images)
        x = self.patch_embed(images.to(self.pos_embed.dtype))  # (B, N, C)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + N, C)
        prefix, mode = self.config.num_prefix_tokens, self.config.pos_embed_resample
        x = x + resample_pos_embed(self.pos_embed, grid, prefix, mode)
        if self.training and self.config.patch_dropout:
            x = drop_patches(x, self.config.patch_dropout, prefix, self.patch_dropout_generator)  # (B, P + K, C)
        return self.norm_pre(x)

    def _final_norm(self, x: Tensor) -> Tensor:
        return x if self.config.norm_after_pool else self.norm(x)

    def forward_features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> tokens (B, P + N, C), class token first; after the final LayerNorm unless
        `norm_after_pool`."""
        return self._final_norm(self.transformer(self.embed(images)))

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`forward_features` and every block's attention probabilities (B, H, P + N, P + N)."""
        x, weights = self.transformer.forward_with_weights(self.embed(images))
        return self._final_norm(x), weights

    def pool(self, tokens: Tensor) -> Tensor:
        """(B, P + N, C) -> (B, C): the config's pooling (with pool="none", the tokens themselves)."""
        pool, patches = self.config.pool, tokens[:, self.config.num_prefix_tokens :]
        if pool == "token":
            pooled = tokens[:, 0]
        elif pool == "avg":
            pooled = patches.mean(dim=1)
        elif pool == "map":
            pooled = self.attn_pool(patches)
        else:
            pooled = tokens
        return self.norm(pooled) if self.config.norm_after_pool else pooled

    def project(self, pooled: Tensor) -> Tensor:
        """Pooled features (B, C) -> embeddings (B, embed_dim), not normalised."""
        return self.proj(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> embeddings (B, embed_dim), not normalised.

        Pooled at the class token, the last block computes that token alone (the patch tokens' outputs
        would be thrown away); the result is `project(pool(forward_features(images)))`.
        """
        if self.config.pool != "token":
            return self.project(self.pool(self.forward_features(images)))
        x = self.embed(images)
        first = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return self.project(self.norm(self.transformer.forward_queries(x, first))[:, 0])

    def no_weight_decay(self) -> set[str]:
        """Names of the class token, position embeddings and pooling probe, which are excluded from weight decay."""
        names = {"pos_embed"}
        if self.class_token is not None:
            names.add("class_token")
        if self.attn_pool is not None:
            names.add("attn_pool.probe")
        return names
