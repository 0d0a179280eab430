"""Building blocks shared by both towers."""

from .attention import Attention, causal_mask
from .attention_pool import AttentionPool
from .block import Block
from .layer_scale import LayerScale
from .mlp import Mlp, QuickGELU, get_act_layer
from .patch_dropout import drop_patches, patches_kept
from .patch_embed import PatchEmbed
from .pos_embed import resample_pos_embed
from .transformer import Transformer

__all__ = [
    "Attention",
    "AttentionPool",
    "Block",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "QuickGELU",
    "Transformer",
    "causal_mask",
    "drop_patches",
    "get_act_layer",
    "patches_kept",
    "resample_pos_embed",
]
