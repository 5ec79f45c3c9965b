"""Where the class tokens sit in a Vim token sequence, and in which orders the scans visit the tokens.

A token sequence is the patch tokens in raster order (all M of the grid, or a subset such as MAE's visible
tokens, still in raster order) with the class tokens of the `cls_mode` inserted:
  middle: one class token after the first n // 2 of the n patch tokens (Vim's layout)
  head:   one class token first
  double: two class tokens, first and last
  mean, max: none (the head pools over the patch tokens)

A scan direction visits every token once. A forward direction visits the patch tokens in its 2-D order and the
class tokens at the step equal to their index in the sequence (middle: after n // 2 patches, head: first,
double: first and last); its `_reverse` twin is the same visit list read backwards. The 2-D orders over a grid
of (rows, cols) patches:
  row:  raster order (rows top to bottom, each left to right); with the rule above this is the sequence itself
  col:  column-major (columns left to right, each top to bottom)
  diag: anti-diagonals r + c = 0, 1, ..., each from its top row down
A subset of the grid is visited in the order its patches have in the full grid's order.
"""
import torch

__all__ = ["CLS_MODES", "SCAN_DIRECTIONS", "num_cls_tokens", "cls_positions", "join_cls", "select_cls", "split_cls",
           "grid_order", "scan_orders"]

CLS_MODES = {"middle": 1, "head": 1, "double": 2, "mean": 0, "max": 0}
SCAN_DIRECTIONS = ("row", "row_reverse", "col", "col_reverse", "diag", "diag_reverse")


def num_cls_tokens(cls_mode):
    if cls_mode not in CLS_MODES:
        raise ValueError(f"unknown cls_mode {cls_mode!r}; expected one of {', '.join(CLS_MODES)}")
    return CLS_MODES[cls_mode]


def cls_positions(cls_mode, n):
    """Indices of the class tokens in a sequence of n patch tokens plus the class tokens, ascending."""
    num_cls_tokens(cls_mode)
    return {"middle": (n // 2,), "head": (0,), "double": (0, n + 1)}.get(cls_mode, ())


def join_cls(patches, cls, positions):
    """patches (batch, n, C), cls (batch, len(positions), C) -> (batch, n + len(positions), C), class tokens at
    `positions` (ascending indices in the joined sequence)."""
    parts, start = [], 0
    for i, pos in enumerate(positions):
        parts += [patches[:, start:pos - i], cls[:, i:i + 1]]
        start = pos - i
    return torch.cat(parts + [patches[:, start:]], dim=1) if parts else patches


def select_cls(x, positions):
    """x (batch, L, C) -> its class tokens (batch, len(positions), C); a view for one class token."""
    if len(positions) == 1:
        return x[:, positions[0]:positions[0] + 1]
    return torch.cat([x[:, p:p + 1] for p in positions], dim=1) if positions else x[:, :0]


def split_cls(x, positions):
    """x (batch, L, C) -> (class tokens (batch, len(positions), C), patch tokens (batch, L - len(positions), C))."""
    if not positions:
        return x[:, :0], x
    bounds = [-1, *positions, x.shape[1]]
    patches = torch.cat([x[:, a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    return select_cls(x, positions), patches


def grid_order(name, grid_size, device=None):
    """Raster indices of the (rows, cols) grid in the visiting order of forward direction `name`, (M,)."""
    rows, cols = grid_size
    raster = torch.arange(rows * cols, device=device).view(rows, cols)
    if name == "row":
        return raster.flatten()
    if name == "col":
        return raster.t().flatten()
    if name == "diag":
        r = torch.arange(rows, device=device).view(rows, 1).expand(rows, cols)
        c = torch.arange(cols, device=device).view(1, cols).expand(rows, cols)
        key = (r + c) * rows + r          # anti-diagonal first, then row
        return raster.flatten()[key.flatten().argsort()]
    raise ValueError(f"unknown scan order {name!r}; expected one of {', '.join(SCAN_DIRECTIONS)}")


def scan_orders(directions, grid_size, cls_mode, seq_len, patch_ids=None, device=None):
    """Visit lists of a token sequence, one per direction.

    directions: names from SCAN_DIRECTIONS. seq_len: tokens in the sequence (patch tokens + class tokens).
    patch_ids: (batch, n) ascending raster indices of the sequence's patch tokens (a subset of the grid), or
        None: the whole grid (row / row_reverse need no grid and accept any seq_len).
    Returns a long tensor (K, seq_len), or (K, batch, seq_len) with patch_ids: entry [k, t] is the index in the
    sequence of the token that direction k visits at step t.
    """
    n = seq_len - num_cls_tokens(cls_mode)
    seq = torch.arange(seq_len, device=device)
    # sequence index of the j-th patch token: j plus the class tokens before it (device ops only, no host sync)
    patch_seq = seq[:n] + sum((seq[:n] >= pos - i).long() for i, pos in enumerate(cls_positions(cls_mode, n)))
    visits = []
    for name in directions:
        forward = name.removesuffix("_reverse")
        if forward == "row":                                   # raster order: the sequence itself
            visit = seq if patch_ids is None else seq.expand(patch_ids.shape[0], seq_len)
        else:
            rows, cols = grid_size
            if patch_ids is None and n != rows * cols:
                raise ValueError(f"scan order {name!r} needs the grid position of every patch token: "
                                 f"{n} patch tokens are not the {rows}x{cols} grid, pass patch_ids")
            order = grid_order(forward, grid_size, device)
            if patch_ids is None:
                visit = seq.clone()
                visit[patch_seq] = patch_seq[order]
            else:
                rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=device))
                sub = rank[patch_ids].argsort(dim=1)            # the subset's patches in the full order
                visit = seq.repeat(patch_ids.shape[0], 1)
                visit[:, patch_seq] = patch_seq[sub]
        visits.append(visit.flip(-1) if name.endswith("_reverse") else visit)
    return torch.stack(visits)
