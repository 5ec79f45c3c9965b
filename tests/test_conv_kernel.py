"""Bidirectional depthwise conv1d + SiLU: the reference against the model's PyTorch expressions."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv_ref import bidirectional_conv1d_silu_ref


@pytest.mark.parametrize("batch,L,E,K", [(1, 1, 6, 4), (2, 3, 6, 4), (2, 9, 5, 2), (1, 12, 3, 8)])
def test_reference_matches_model_expressions(batch, L, E, K):
    """The reference equals today's model code in float64: nn.Conv1d(padding=K-1)[..., :L] for the forward direction,
    F.conv1d on the right-padded input with the flipped weight for the backward one; gradients included."""
    torch.manual_seed(0)
    conv, conv_b = (nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=True).double() for _ in range(2))
    x = torch.randn(batch, L, 2 * E, dtype=torch.float64)[..., :E].requires_grad_()
    xt = x.transpose(1, 2)
    u_fwd = F.silu(conv(xt)[..., :L])
    u_bwd = F.silu(F.conv1d(F.pad(xt, (0, K - 1)), conv_b.weight.flip(-1), conv_b.bias, groups=E))
    expected = torch.stack([u_fwd, u_bwd]).transpose(-1, -2)                     # (2, batch, L, E)
    weight = torch.stack([conv.weight, conv_b.weight])[:, :, 0]                   # (2, E, K)
    bias = torch.stack([conv.bias, conv_b.bias])
    u = bidirectional_conv1d_silu_ref(x, weight, bias)
    assert u.shape == (2, batch, L, E) and u.is_contiguous() and u.dtype == torch.float64
    torch.testing.assert_close(u, expected, rtol=1e-12, atol=1e-12)
    du = torch.randn_like(u)
    params = [x, conv.weight, conv.bias, conv_b.weight, conv_b.bias]
    for a, b in zip(torch.autograd.grad(u, params, du), torch.autograd.grad(expected, params, du)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
