"""Loading Vim weights: public reference checkpoints, our safetensors exports, position-embedding resizing.

Never unpickles arbitrary objects: torch files are read with weights_only=True.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .token_layout import cls_positions, join_cls, num_cls_tokens, split_cls

__all__ = ["resize_pos_embed", "checkpoint_filter_fn", "read_state_dict", "load_checkpoint"]


def resize_pos_embed(pos_embed, new_grid, old_grid=None, cls_mode="middle"):
    """Resize a position embedding with class-token slots to another patch grid.

    pos_embed: (1, M + c, D) with the c class slots of `cls_mode` (models.token_layout: middle = one slot at
    M // 2, head = slot 0, double = first and last, mean / max = none).
    new_grid / old_grid: (rows, cols); old_grid defaults to a square of M patches.
    The class slots are split out before the grid is interpolated (bicubic) and put back where `cls_mode` places
    them for the new grid; the reference treats slot 0 as the class token, which is wrong for a middle token.
    Returns (1, M' + c, D).
    """
    c = num_cls_tokens(cls_mode)
    M = pos_embed.shape[1] - c
    if old_grid is None:
        side = math.isqrt(M)
        if side * side != M:
            raise ValueError(f"pos_embed has {M} patch slots, not a square grid: pass old_grid")
        old_grid = (side, side)
    new_M = new_grid[0] * new_grid[1]
    cls, grid = split_cls(pos_embed, cls_positions(cls_mode, M))
    if tuple(old_grid) != tuple(new_grid):
        D = grid.shape[-1]
        grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_M, D).to(pos_embed.dtype)
    return join_cls(grid, cls, cls_positions(cls_mode, new_M))


def _unwrap(checkpoint):
    """The state dict inside the usual containers ({"model": ...}, {"state_dict": ...}, {"module": ...})."""
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return _unwrap(checkpoint[key])
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


def read_state_dict(path):
    """Tensors of a .safetensors file or a torch file (read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True))


def checkpoint_filter_fn(state_dict, model):
    """Adapt a Vim state dict to `model`: resize pos_embed to its grid, the class slots where the model's cls_mode
    puts them (the checkpoint is taken to have the same cls_mode)."""
    state_dict = _unwrap(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        state_dict = dict(state_dict, pos_embed=resize_pos_embed(pos, model.patch_embed.grid_size,
                                                                 cls_mode=model.cls_mode))
    return state_dict


def load_checkpoint(model, path, strict=True, drop_head=False):
    """Load weights into `model` from a public Vim checkpoint or one of our exports.

    pos_embed is resized to the model's resolution and stride. drop_head=True ignores the checkpoint's
    head and keeps the model's (fine-tuning on other classes). A key or shape mismatch raises a
    ValueError that names every offending key and shape. Returns the names of the parameters left
    unloaded (empty when strict).
    """
    state_dict = checkpoint_filter_fn(read_state_dict(path), model)
    if drop_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    own = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not (drop_head and k.startswith("head.")))
    if problems or unexpected or (strict and missing):
        lines = [f"checkpoint {path} does not fit {type(model).__name__}:"]
        lines += [f"  shape mismatch {p}" for p in problems]
        lines += [f"  unexpected key {k}" for k in unexpected]
        lines += [f"  missing key {k}" for k in (missing if strict else [])]
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)
    return missing
