"""Building blocks shared by both towers."""

from .attention import Attention, causal_mask
from .block import Block
from .mlp import Mlp, QuickGELU, get_act_layer
from .patch_embed import PatchEmbed
from .pos_embed import resample_pos_embed
from .transformer import Transformer

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "PatchEmbed",
    "QuickGELU",
    "Transformer",
    "causal_mask",
    "get_act_layer",
    "resample_pos_embed",
]
