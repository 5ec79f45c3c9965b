"""Vim encoders, registered in timm on import: `import models; timm.create_model("vim_tiny_patch16_224")`."""
from .checkpoint import checkpoint_filter_fn, load_checkpoint, read_state_dict, resize_pos_embed
from .vim import BiMambaMixer, Block, PatchEmbed, RMSNorm, VisionMamba

__all__ = [
    "VisionMamba", "BiMambaMixer", "Block", "RMSNorm", "PatchEmbed",
    "load_checkpoint", "read_state_dict", "resize_pos_embed", "checkpoint_filter_fn",
]
