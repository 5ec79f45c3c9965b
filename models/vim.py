"""Vision Mamba (Vim) encoders.

"Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
arXiv 2401.09417. Follows the shapes, parameter names and initialisation of the public reference
(hustvl/Vim, `vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`), so its
checkpoints load with strict=True, but with two of its bugs fixed: the backward dt bias is initialised
like the forward one, and position embeddings are resized around the middle class token.
Beyond the reference model, the paper's design space is configuration: class-token strategies (`cls_mode`),
bidirectional strategies (`bidir_mode`) and 2-D scan orders (`scan_orders`), see VisionMamba.
"""
import math
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from kernels import bidirectional_conv1d_silu, bidirectional_scan, multidirectional_scan

from .checkpoint import checkpoint_filter_fn
from .token_layout import cls_positions, join_cls, num_cls_tokens, select_cls, split_cls
from .token_layout import scan_orders as scan_orders_table

__all__ = ["VisionMamba", "MambaMixer", "Block", "RMSNorm", "PatchEmbed", "BIDIR_MODES"]


class RMSNorm(nn.Module):
    """RMSNorm without bias, x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype.

    PyTorch's own F.rms_norm (recent versions dispatch it to a fused kernel on CUDA) rather than six elementwise ops
    and their backward."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


class PatchEmbed(nn.Module):
    """Conv2d patchify with a stride that may differ from the patch size (stride 8 = long-sequence Vim)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x):
        """x: (batch, C, H, W) -> (batch, num_patches, embed_dim), raster order."""
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


def _dt_bias_init(bias: torch.Tensor, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
    """Bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], so softplus(bias) starts there."""
    dt = torch.exp(torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    with torch.no_grad():
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))


# parameter-name suffix of each scan direction (the reference's for the two row directions)
DIRECTION_SUFFIX = {"row": "", "row_reverse": "_b", "col": "_col", "col_reverse": "_col_b", "diag": "_diag",
                    "diag_reverse": "_diag_b"}
V2_DIRECTIONS = ("row", "row_reverse")


class MambaMixer(nn.Module):
    """Mamba mixer with one SSM per scan direction: shared in/out projections; per direction a depthwise causal
    conv1d (along that direction's order), x/dt projections, A and D. The default is Vim's bidirectional "v2" mixer,
    both directions through one `bidirectional_conv1d_silu` and one `bidirectional_scan` call; other direction sets
    go through `multidirectional_scan`.

    Parameter names: a single SSM is unsuffixed (conv1d, x_proj, dt_proj, A_log, D) whatever its direction; with
    several, each carries its direction's suffix (DIRECTION_SUFFIX: conv1d_b, x_proj_col, A_col_b_log, D_diag, ...).
    """

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank=None,
            directions=V2_DIRECTIONS,
            share_conv: bool = False,
            scan_backend=None,
            scan_save_states: bool = True,
    ):
        """
        Args:
            dim: token width D; the inner width is expand * D.
            d_state, d_conv, expand, dt_rank: SSM state size N, conv kernel, inner expansion, dt rank (None: D / 16).
            directions: scan directions (models.token_layout.SCAN_DIRECTIONS), each with its own SSM; their outputs
                are averaged, then gated by silu(z).
            share_conv: the backward SSM reads the forward conv's output (Vim's "v1" style, no conv1d_b); only with
                directions ("row", "row_reverse").
            scan_backend: "reference", "triton" or None, see kernels.
            scan_save_states: the two-direction Triton scan keeps states for its backward (faster, more memory),
                see kernels.bidirectional_scan.
        """
        super().__init__()
        directions = tuple(directions)
        unknown = [d for d in directions if d not in DIRECTION_SUFFIX]
        if not directions or unknown or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct names from {', '.join(DIRECTION_SUFFIX)}, got {directions}")
        if share_conv and directions != V2_DIRECTIONS:
            raise ValueError(f"share_conv needs directions {V2_DIRECTIONS}, got {directions}")
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.scan_backend = scan_backend
        self.scan_save_states = scan_save_states
        self.directions = directions
        self.share_conv = share_conv
        # the default pair goes through the two-direction kernel, which reads the backward direction by itself
        self.needs_orders = directions != V2_DIRECTIONS
        self.suffixes = [""] if len(directions) == 1 else [DIRECTION_SUFFIX[d] for d in directions]
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.out_proj = nn.Linear(E, dim, bias=False)
        for i, suffix in enumerate(self.suffixes):
            if not (share_conv and i > 0):
                setattr(self, "conv1d" + suffix, nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=True))
            setattr(self, "x_proj" + suffix, nn.Linear(E, R + 2 * N, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(R, E, bias=True))
            A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)
            setattr(self, f"A{suffix}_log", nn.Parameter(A_log))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(E)))

    def init_weights(self):
        for suffix in self.suffixes:
            dt_proj = getattr(self, "dt_proj" + suffix)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            _dt_bias_init(dt_proj.bias)

    def _v2_scan(self, hidden_states):
        """The default pair of directions: hidden_states (batch, L, dim) -> gated scan output y (batch, E, L).

        Token-major throughout: the conv kernel reads x as a view of the in_proj output and writes u with
        channels contiguous, both directions' projections are one batched matmul each, and the scan gets
        transposed views of those results, so no activation is copied between the kernels.
        """
        E = self.d_inner
        xz = self.in_proj(hidden_states)                                       # (batch, L, 2E)
        x, z = xz.split(E, dim=-1)    # views; the backward concatenates dx, dz once (slices would zero-fill twice)
        conv_weight = torch.stack([self.conv1d.weight, self.conv1d_b.weight])[:, :, 0]     # (2, E, K)
        conv_bias = torch.stack([self.conv1d.bias, self.conv1d_b.bias])
        u = bidirectional_conv1d_silu(x, conv_weight, conv_bias, backend=self.scan_backend)  # (2, batch, L, E)
        delta, A, B, C, D, delta_bias = self._ssm_params(u)
        return bidirectional_scan(u.transpose(-1, -2), delta, A, B, C, D, z.transpose(1, 2), delta_bias,
                                  backend=self.scan_backend, save_states=self.scan_save_states)

    def _ssm_params(self, u):
        """The scan's inputs of every direction from u (K, batch, L, E), token-major: delta (K, batch, E, L) and
        B, C (K, batch, N, L) as transposed views of one batched matmul each (no copies), A, D, delta_bias (K, .)."""
        N, R = self.d_state, self.dt_rank
        batch, L = u.shape[1:3]

        def stacked(name, attr="weight"):
            return torch.stack([getattr(getattr(self, name + s), attr) for s in self.suffixes])

        # dt_rank zero-padded to a multiple of 8 (Vim-T: 12 -> 16): with every matmul dimension and view offset
        # 16-byte aligned cuBLAS leaves its slow misaligned kernels for the weight gradients (BENCHMARKS.md)
        x_w, dt_w, pad = stacked("x_proj"), stacked("dt_proj"), -R % 8
        if pad:
            dt_rows, bc_rows = x_w.split([R, 2 * N], dim=1)
            x_w = torch.cat([dt_rows, x_w.new_zeros(x_w.shape[0], pad, x_w.shape[2]), bc_rows], dim=1)
            dt_w = F.pad(dt_w, (0, pad))
        x_dbl = u.flatten(1, 2) @ x_w.transpose(1, 2)                         # (K, batch * L, R + pad + 2N)
        dt_low, B, C = x_dbl.split([R + pad, N, N], dim=-1)
        delta = dt_low @ dt_w.transpose(1, 2)

        def channels_first(t):                                                 # (K, batch * L, c) -> (K, batch, c, L)
            return t.unflatten(1, (batch, L)).transpose(-1, -2)

        A = -torch.exp(torch.stack([getattr(self, f"A{s}_log") for s in self.suffixes]).float())
        D = torch.stack([getattr(self, "D" + s) for s in self.suffixes]).float()
        return (channels_first(delta), A, channels_first(B), channels_first(C), D,
                stacked("dt_proj", "bias").float())

    def no_weight_decay(self):
        """Names of the A and D parameters (kept in fp32, never decayed)."""
        return {name for suffix in self.suffixes for name in (f"A{suffix}_log", "D" + suffix)}

    def _conv(self, x, conv, direction, order):
        """Depthwise causal conv1d along the direction's visiting order, returned in the original token order.

        x: (batch, E, L); order: (L,) or (batch, L) visit list (unused for the row directions).
        """
        L = x.shape[-1]
        if direction == "row":
            return conv(x)[..., :L]
        if direction == "row_reverse":
            # anti-causal conv: the reference's causal conv on the flipped sequence, written on the original order
            return F.conv1d(F.pad(x, (0, conv.kernel_size[0] - 1)), conv.weight.flip(-1), conv.bias, groups=x.shape[1])
        # the conv is not fused into the scan kernel (in no direction yet): gather the tokens into the visiting
        # order, convolve causally, scatter the result back
        index = order.view(-1, 1, L).expand(x.shape[0], x.shape[1], L)
        u = conv(x.gather(-1, index))[..., :L]
        return torch.zeros_like(u).scatter(-1, index, u)

    def forward(self, hidden_states, orders=None):
        """hidden_states: (batch, L, dim) -> (batch, L, dim).

        orders: (K, L) or (K, batch, L) visit lists of this mixer's K directions (models.token_layout.scan_orders);
        None: the directions are row / row_reverse of a plain sequence (built here).
        """
        if not self.needs_orders and not self.share_conv:
            return self.out_proj(self._v2_scan(hidden_states).transpose(1, 2))
        xz = self.in_proj(hidden_states).transpose(1, 2)                      # (batch, 2E, L)
        x, z = xz.chunk(2, dim=1)
        L = x.shape[-1]
        if self.needs_orders and orders is None:
            if any(d not in V2_DIRECTIONS for d in self.directions):
                raise ValueError(f"directions {self.directions} need the token orders of the 2-D grid")
            row = torch.arange(L, device=x.device)
            orders = torch.stack([row if d == "row" else row.flip(0) for d in self.directions])
        # u: (K, batch, L, E), token-major
        if self.share_conv:
            # one conv output read by both directions: made token-major once and expanded, not stacked twice
            u = F.silu(self._conv(x, self.conv1d, "row", None)).transpose(1, 2).contiguous().expand(2, -1, -1, -1)
        else:
            u = torch.stack([F.silu(self._conv(x, getattr(self, "conv1d" + s), d, orders[i] if self.needs_orders
                                               else None)).transpose(1, 2)
                             for i, (d, s) in enumerate(zip(self.directions, self.suffixes))])
        delta, A, B, C, D, delta_bias = self._ssm_params(u)
        scan_args = (u.transpose(-1, -2), delta, A, B, C, D, z, delta_bias)
        if self.needs_orders:
            y = multidirectional_scan(*scan_args, orders, backend=self.scan_backend)
        else:
            y = bidirectional_scan(*scan_args, backend=self.scan_backend, save_states=self.scan_save_states)
        return self.out_proj(y.transpose(1, 2))


class Block(nn.Module):
    """Pre-norm residual block x <- x + DropPath(Mixer(RMSNorm(x))), residual stream kept in fp32."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, mixer_layer=MambaMixer, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer_layer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, orders=None):
        """x: (batch, L, dim); orders: the mixer's visit lists (see MambaMixer.forward)."""
        return x.float() + self.drop_path(self.mixer(self.norm(x), orders)).float()


BIDIR_MODES = ("none", "sequence", "block", "ssm", "v2")


def _layer_directions(bidir_mode, scan_orders, depth):
    """(directions, share_conv) of each block's mixer."""
    if bidir_mode == "v2":
        return [(tuple(scan_orders), False)] * depth
    if bidir_mode == "ssm":
        return [(V2_DIRECTIONS, True)] * depth
    if bidir_mode == "block":
        return [(("row",) if i % 2 == 0 else ("row_reverse",), False) for i in range(depth)]
    return [(("row",), False)] * depth


class VisionMamba(nn.Module):
    """Vim encoder: patch embedding, class token(s), absolute position embedding, Mamba blocks (bidirectional by
    default), final RMSNorm and a linear head on the class token (or on pooled tokens).

    The design space of the paper's ablations: `cls_mode` (where the class tokens go and what the head reads),
    `bidir_mode` (how the blocks see both directions) and `scan_orders` (the 2-D orders the v2 mixer scans in).
    The defaults (middle, v2, row + row_reverse) are the reference model, parameter for parameter.
    """

    def __init__(
            self,
            img_size=224,
            patch_size: int = 16,
            stride: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-5,
            scan_backend=None,
            scan_save_states: bool = True,
            cls_mode: str = "middle",
            bidir_mode: str = "v2",
            scan_orders=None,
    ):
        """
        Args:
            img_size: input resolution (int or (H, W)).
            patch_size: patch-embedding kernel size.
            stride: patch-embedding stride (16, or 8 for the long-sequence variant).
            in_chans: input channels.
            num_classes: head outputs; 0 = no head (features only).
            embed_dim: token width D; the mixer's inner width is 2D.
            depth: number of blocks.
            d_state: SSM state size N.
            drop_rate: dropout after the position embedding.
            drop_path_rate: stochastic depth of the last block; linear from 0 over the blocks.
            norm_eps: RMSNorm epsilon.
            scan_backend: "reference", "triton" or None (best available), see kernels.bidirectional_scan.
            scan_save_states: training with the Triton scan, each layer's forward keeps the states its backward
                would otherwise recompute (about 8 % faster scan forward+backward, about a third more activation
                memory; BENCHMARKS.md); False trades the speed back for the memory.
            cls_mode: "middle" (one class token in the middle of the patches, the head reads it), "head" (one
                class token first), "double" (class tokens first and last, the head reads their mean), "mean" (no
                class token, the head reads the mean of the tokens), "max" (no class token, the head is applied
                to every token and the logits are max-pooled; pre-logit features are the token mean).
            bidir_mode: "v2" (a backward SSM with its own conv1d beside the forward one, per block), "ssm" (a
                backward SSM reading the forward conv1d's output: no conv1d_b), "block" (one SSM per block, odd
                blocks scan backward), "sequence" (one forward SSM per block; in training the whole token
                sequence is reversed with probability 0.5 per batch, then restored), "none" (one forward SSM).
            scan_orders: the directions of the v2 mixer, each with its own SSM (conv1d, x_proj, dt_proj, A, D), from
                row, row_reverse, col, col_reverse, diag, diag_reverse (models.token_layout); None = [row,
                row_reverse]. Other bidir_modes fix their directions and accept only None or that default.
        """
        super().__init__()
        assert stride <= patch_size, "a stride larger than the patch would skip pixels"
        if bidir_mode not in BIDIR_MODES:
            raise ValueError(f"unknown bidir_mode {bidir_mode!r}; expected one of {', '.join(BIDIR_MODES)}")
        scan_orders = V2_DIRECTIONS if scan_orders is None else tuple(scan_orders)
        if bidir_mode != "v2" and scan_orders != V2_DIRECTIONS:
            raise ValueError(f"scan_orders {list(scan_orders)} need bidir_mode 'v2' (each direction its own conv1d "
                             f"and SSM); bidir_mode {bidir_mode!r} fixes its own directions")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.grad_checkpointing = False
        self.cls_mode = cls_mode
        self.num_cls_tokens = num_cls_tokens(cls_mode)
        self.bidir_mode = bidir_mode
        self.scan_orders = scan_orders
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        positions = cls_positions(cls_mode, self.num_patches)
        self.cls_index = positions[0] if positions else None       # the (first) class token's index
        self.cls_token = nn.Parameter(torch.zeros(1, self.num_cls_tokens, embed_dim)) if self.num_cls_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + self.num_cls_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        mixers = _layer_directions(bidir_mode, scan_orders, depth)
        self.layers = nn.ModuleList([
            Block(embed_dim, drop_path=dpr[i], norm_eps=norm_eps, d_state=d_state, scan_backend=scan_backend,
                  scan_save_states=scan_save_states, directions=directions, share_conv=share_conv)
            for i, (directions, share_conv) in enumerate(mixers)
        ])
        # visit lists of the full token sequence, one table per distinct direction set that needs them; buffers
        # so they follow the model's device, not persistent so the state dict stays the reference's
        self._direction_sets = sorted({layer.mixer.directions for layer in self.layers if layer.mixer.needs_orders})
        self._layer_sets = [self._direction_sets.index(layer.mixer.directions) if layer.mixer.needs_orders else None
                            for layer in self.layers]
        for j, directions in enumerate(self._direction_sets):
            table = scan_orders_table(directions, self.patch_embed.grid_size, cls_mode, self.pos_embed.shape[1])
            self.register_buffer(f"scan_order_{j}", table, persistent=False)
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            layer.mixer.init_weights()
            # GPT-2 style: shrink the residual branch's last projection by sqrt(depth)
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.depth)

    @property
    def graph_safe(self):
        """Whether a CUDA graph of the training forward replays it faithfully (engine/cuda_graph.py): not with
        bidir_mode "sequence", which flips a coin on the host per batch."""
        return self.bidir_mode != "sequence"

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {"pos_embed"} | ({"cls_token"} if self.cls_token is not None else set())
        for i, layer in enumerate(self.layers):
            names |= {f"layers.{i}.mixer.{p}" for p in layer.mixer.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def cls_positions(self, n):
        """Indices of the class tokens in a sequence of n patch tokens plus the class tokens (models.token_layout)."""
        return cls_positions(self.cls_mode, n)

    def join_cls(self, patches, cls):
        """patches (batch, n, C), cls (batch, num_cls_tokens, C) -> the sequence (batch, n + num_cls_tokens, C)."""
        return join_cls(patches, cls, self.cls_positions(patches.shape[1]))

    def split_cls(self, x):
        """A sequence (batch, n + num_cls_tokens, C) -> (class tokens (batch, num_cls_tokens, C), patches (batch, n, C))."""
        return split_cls(x, self.cls_positions(x.shape[1] - self.num_cls_tokens))

    def patch_pos_embed(self):
        """The position embedding of the patch slots, (1, M, D), raster order (class slots removed)."""
        return self.split_cls(self.pos_embed)[1]

    def patch_tokens(self, x):
        """x: (batch, C, H, W) -> patch tokens with their position embedding, (batch, M, D), no class token."""
        return self.patch_embed(x) + self.patch_pos_embed()

    def cls_token_with_pos(self):
        """The class tokens with their position embedding, (1, num_cls_tokens, D) (zero tokens for mean / max)."""
        cls_pos = select_cls(self.pos_embed, self.cls_positions(self.num_patches))
        return cls_pos if self.cls_token is None else self.cls_token + cls_pos

    def insert_cls(self, tokens):
        """tokens (batch, n, D): patch tokens (all, or a subset in raster order) -> the sequence with the class
        tokens (and their position embedding) at cls_positions(n), (batch, n + num_cls_tokens, D)."""
        return self.join_cls(tokens, self.cls_token_with_pos().expand(tokens.shape[0], -1, -1))

    def _orders(self, L, patch_ids):
        """The visit lists of each direction set for a sequence of L tokens (None: the set needs none)."""
        if patch_ids is None and L == self.pos_embed.shape[1]:
            return [getattr(self, f"scan_order_{j}") for j in range(len(self._direction_sets))]
        return [scan_orders_table(d, self.patch_embed.grid_size, self.cls_mode, L, patch_ids, self.pos_embed.device)
                for d in self._direction_sets]

    def forward_blocks(self, x, patch_ids=None):
        """A token sequence through the blocks and the final norm -> (batch, L, D), fp32.

        x: (batch, L, D), laid out as insert_cls builds it: patch tokens in raster order, class tokens at
            cls_positions. patch_ids: (batch, n) ascending raster indices of x's n patch tokens when they are a
            subset of the grid (MAE's visible tokens), which 2-D scan orders need; None = the whole grid (or any
            sequence, for row-only scans).
        """
        orders = self._orders(x.shape[1], patch_ids) if self._direction_sets else []
        # bidir_mode "sequence": the backward direction comes from reversing the whole sequence, half the batches
        reverse = self.bidir_mode == "sequence" and self.training and bool(torch.rand(()) < 0.5)
        if reverse:
            x = x.flip(1)
        x = self.pos_drop(x)
        for layer, j in zip(self.layers, self._layer_sets):
            layer_orders = orders[j] if j is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, layer_orders, use_reentrant=False)
            else:
                x = layer(x, layer_orders)
        if reverse:
            x = x.flip(1)
        return self.norm_f(x)

    def forward_features(self, x):
        """x: (batch, C, H, W) -> all tokens after the final norm, (batch, M + num_cls_tokens, D), class tokens at
        cls_positions(M)."""
        return self.forward_blocks(self.insert_cls(self.patch_tokens(x)))

    def forward_head(self, x, pre_logits: bool = False):
        """x: (batch, M + num_cls_tokens, D) -> features (batch, D) or logits (batch, num_classes).

        Features: the class token (middle, head), the mean of the two class tokens (double), the token mean (mean,
        and max's pre-logits). max: logits are the head applied to every token, max-pooled over the tokens.
        """
        if self.cls_mode == "max" and not pre_logits:
            return self.head(x).amax(dim=1)
        positions = self.cls_positions(x.shape[1] - self.num_cls_tokens)
        if len(positions) == 2:
            x = (x[:, positions[0]] + x[:, positions[1]]) * 0.5
        elif positions:
            x = x[:, positions[0]]
        else:
            x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs):
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2401.09417", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    name: _cfg() for name in (
        "vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
        "vim_tiny_patch16_stride8_224", "vim_small_patch16_stride8_224",
    )
})


def _create_vim(variant, pretrained=False, **kwargs):
    # no weights are hosted for download: pretrained=True needs pretrained_cfg_overlay=dict(file=PATH),
    # or call models.load_checkpoint after creation
    return build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained=False, **kwargs):
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(dict(embed_dim=192, depth=24), **kwargs))


@register_model
def vim_small_patch16_224(pretrained=False, **kwargs):
    return _create_vim("vim_small_patch16_224", pretrained, **dict(dict(embed_dim=384, depth=24), **kwargs))


@register_model
def vim_base_patch16_224(pretrained=False, **kwargs):
    return _create_vim("vim_base_patch16_224", pretrained, **dict(dict(embed_dim=768, depth=24), **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained=False, **kwargs):
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(dict(embed_dim=192, depth=24, stride=8), **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained=False, **kwargs):
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(dict(embed_dim=384, depth=24, stride=8), **kwargs))
