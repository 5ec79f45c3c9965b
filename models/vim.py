"""Vision Mamba (Vim) encoders.

"Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
arXiv 2401.09417. Follows the shapes, parameter names and initialisation of the public reference
(hustvl/Vim, `vim_*_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2`), so its
checkpoints load with strict=True, but with two of its bugs fixed: the backward dt bias is initialised
like the forward one, and position embeddings are resized around the middle class token.
"""
import math
import torch
import torch.nn as nn
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from kernels import bidirectional_conv1d_silu, bidirectional_scan

from .checkpoint import checkpoint_filter_fn

__all__ = ["VisionMamba", "BiMambaMixer", "Block", "RMSNorm", "PatchEmbed"]


class RMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


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


class BiMambaMixer(nn.Module):
    """Vim's bidirectional Mamba mixer ("v2"): shared in/out projections, per-direction conv1d, x/dt
    projections, A and D; both directions go through one `bidirectional_conv1d_silu` and one
    `bidirectional_scan` call."""

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank=None,
            scan_backend=None,
    ):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.scan_backend = scan_backend
        E, N, R = self.d_inner, d_state, self.dt_rank
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.out_proj = nn.Linear(E, dim, bias=False)
        # the reference's names: unsuffixed = forward direction, "_b" = backward direction
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=True))
            setattr(self, "x_proj" + suffix, nn.Linear(E, R + 2 * N, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(R, E, bias=True))
            A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)
            setattr(self, ("A_log", "A_b_log")[suffix == "_b"], nn.Parameter(A_log))
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(E)))

    def init_weights(self):
        for dt_proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            _dt_bias_init(dt_proj.bias)

    def forward(self, hidden_states):
        """hidden_states: (batch, L, dim) -> (batch, L, dim).

        Token-major throughout: the conv kernel reads x as a view of the in_proj output and writes u with
        channels contiguous, both directions' projections are one batched matmul each, and the scan gets
        transposed views of those results, so no activation is copied between the kernels.
        """
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        xz = self.in_proj(hidden_states)                                       # (batch, L, 2E)
        x, z = xz[..., :E], xz[..., E:]
        conv_weight = torch.stack([self.conv1d.weight, self.conv1d_b.weight])[:, :, 0]     # (2, E, K)
        conv_bias = torch.stack([self.conv1d.bias, self.conv1d_b.bias])
        u = bidirectional_conv1d_silu(x, conv_weight, conv_bias, backend=self.scan_backend)  # (2, batch, L, E)
        x_dbl = u.flatten(1, 2) @ torch.stack([self.x_proj.weight, self.x_proj_b.weight]).transpose(1, 2)
        dt_low, B, C = x_dbl.split([R, N, N], dim=-1)                          # (2, batch * L, .)
        delta = dt_low @ torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]).transpose(1, 2)
        batch, L = hidden_states.shape[:2]

        def channels_first(t):                                                 # (2, batch * L, c) -> (2, batch, c, L)
            return t.unflatten(1, (batch, L)).transpose(-1, -2)

        A = -torch.exp(torch.stack([self.A_log, self.A_b_log]).float())
        D = torch.stack([self.D, self.D_b]).float()
        delta_bias = torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float()
        y = bidirectional_scan(channels_first(u.flatten(1, 2)), channels_first(delta), A, channels_first(B),
                               channels_first(C), D, z.transpose(1, 2), delta_bias, backend=self.scan_backend)
        return self.out_proj(y.transpose(1, 2))


class Block(nn.Module):
    """Pre-norm residual block x <- x + DropPath(Mixer(RMSNorm(x))), residual stream kept in fp32."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, mixer_layer=BiMambaMixer, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer_layer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        return x.float() + self.drop_path(self.mixer(self.norm(x))).float()


class VisionMamba(nn.Module):
    """Vim encoder: patch embedding, middle class token, absolute position embedding, bidirectional
    Mamba blocks, final RMSNorm and a linear head on the class token."""

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
        """
        super().__init__()
        assert stride <= patch_size, "a stride larger than the patch would skip pixels"
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_index = self.num_patches // 2                   # the class token sits in the middle
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList([
            Block(embed_dim, drop_path=dpr[i], norm_eps=norm_eps, d_state=d_state, scan_backend=scan_backend)
            for i in range(depth)
        ])
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
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

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {"pos_embed", "cls_token"}
        for i in range(self.depth):
            names |= {f"layers.{i}.mixer.{p}" for p in ("A_log", "A_b_log", "D", "D_b")}
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

    def patch_pos_embed(self):
        """The position embedding of the patch slots, (1, M, D), raster order (class slot removed)."""
        return torch.cat([self.pos_embed[:, :self.cls_index], self.pos_embed[:, self.cls_index + 1:]], dim=1)

    def patch_tokens(self, x):
        """x: (batch, C, H, W) -> patch tokens with their position embedding, (batch, M, D), no class token."""
        return self.patch_embed(x) + self.patch_pos_embed()

    def cls_token_with_pos(self):
        """The class token with its position embedding, (1, 1, D)."""
        return self.cls_token + self.pos_embed[:, self.cls_index:self.cls_index + 1]

    def forward_blocks(self, x):
        """Any token sequence (batch, L, D) through the blocks and the final norm -> (batch, L, D), fp32."""
        x = self.pos_drop(x)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x)

    def forward_features(self, x):
        """x: (batch, C, H, W) -> all tokens after the final norm, (batch, M + 1, D); class token at cls_index."""
        tokens = self.patch_tokens(x)
        cls = self.cls_token_with_pos().expand(x.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :self.cls_index], cls, tokens[:, self.cls_index:]], dim=1)
        return self.forward_blocks(tokens)

    def forward_head(self, x, pre_logits: bool = False):
        """x: (batch, M + 1, D) -> class-token features (batch, D) or logits (batch, num_classes)."""
        x = x[:, self.cls_index]
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
