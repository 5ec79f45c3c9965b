"""Vim encoders, registered in timm on import: `import models; timm.create_model("vim_tiny_patch16_224")`."""
from .checkpoint import checkpoint_filter_fn, load_checkpoint, read_state_dict, resize_pos_embed
from .token_layout import CLS_MODES, SCAN_DIRECTIONS, scan_orders
from .vim import BIDIR_MODES, Block, MambaMixer, PatchEmbed, RMSNorm, VisionMamba

__all__ = [
    "VisionMamba", "MambaMixer", "Block", "RMSNorm", "PatchEmbed",
    "load_checkpoint", "read_state_dict", "resize_pos_embed", "checkpoint_filter_fn",
    "CLS_MODES", "BIDIR_MODES", "SCAN_DIRECTIONS", "scan_orders",
]
