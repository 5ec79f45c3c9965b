"""Reference bidirectional depthwise conv1d + SiLU (Vim's per-direction conv) in plain PyTorch.

The specification and test oracle of the fused kernel: differentiable, any device and dtype (arithmetic in fp32, or
fp64 for fp64 inputs), token-major in and out. The convolution is written as K shifted multiply-adds on a padded copy
of x, which reads as the formula (no transposes, no flipped weights).
"""
import torch
import torch.nn.functional as F

from ._checks import check_conv_inputs


def bidirectional_conv1d_silu_ref(x, weight, bias):
    """u[0] = silu(causal conv of x), u[1] = silu(anti-causal conv of x), shapes as in
    `kernels.bidirectional_conv1d_silu`. Returns (2, batch, L, E), contiguous, in x's dtype."""
    _, L, _, K = check_conv_inputs(x, weight, bias)
    dtype = torch.promote_types(x.dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype)
    # xp[:, j] = x[:, j - (K - 1)], zero outside 0..L-1
    xp = F.pad(x.to(dtype), (0, 0, K - 1, K - 1))
    p_fwd = b[0] + sum(w[0, :, k] * xp[:, k:k + L] for k in range(K))                          # x[t - (K-1) + k]
    p_bwd = b[1] + sum(w[1, :, k] * xp[:, 2 * (K - 1) - k:2 * (K - 1) - k + L] for k in range(K))  # x[t + (K-1) - k]
    return F.silu(torch.stack([p_fwd, p_bwd])).to(x.dtype)
