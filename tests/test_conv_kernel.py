"""Bidirectional depthwise conv1d + SiLU: the reference against the model's PyTorch expressions, the Triton kernel
against the reference (forward, dx, dweight, dbias).

The Triton kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported).
Shapes are tiny but cross every border the GPU sees: the token block (L = 70 > 32 forward, > 16 backward tokens), the
channel block (E = 150 > 128), the batch group of the backward (batch 3 in groups of 2) and the zero padding at both
sequence ends (L = 1 and 3 < K - 1 halo rows).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from helpers import interpreted_kernel_modules, interpreter_bounds_check  # noqa: E402
from kernels.conv_ref import bidirectional_conv1d_silu_ref  # noqa: E402

_, ct = interpreted_kernel_modules("kernels.scan_triton", "kernels.conv_triton")


def make_inputs(batch, L, E, K, dtype=torch.float32, layout="half", seed=0):
    """x as the model hands it over (layout "half": the first half of a (batch, L, 2E) tensor) or channel-major
    ("channel_major": a (batch, E, L) tensor transposed), weight and bias fp32 (float64 for a float64 x)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "half":
        base = torch.randn(batch, L, 2 * E, generator=g).to(dtype)
    else:
        base = torch.randn(batch, E, L, generator=g).to(dtype)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.randn(2, E, K, generator=g) * 0.5).to(pdtype)
    bias = (torch.randn(2, E, generator=g) * 0.3).to(pdtype)
    return base, weight, bias


def x_of(base, E, layout):
    return base[..., :E] if layout == "half" else base.transpose(1, 2)


def run(fn, base, weight, bias, E, du, layout="half", **kw):
    """Forward and gradients; the x gradient is read on the leaf, i.e. through the view."""
    base, weight, bias = (t.detach().clone().requires_grad_() for t in (base, weight, bias))
    u = fn(x_of(base, E, layout), weight, bias, **kw)
    u.backward(du.to(u.dtype))
    return u.detach(), x_of(base.grad, E, layout), weight.grad, bias.grad


def reference(base, weight, bias, E, du, layout="half"):
    return run(bidirectional_conv1d_silu_ref, base.double(), weight.double(), bias.double(), E, du.double(), layout)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(name, got, ref, rtol=1e-5, atol=1e-5):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item() + 1e-12,
                               msg=lambda m: f"{name}: {m}")


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


CASES = [
    # batch, L, E, K, batch_per_program
    (1, 1, 20, 4, None),
    (3, 3, 20, 4, None),
    (1, 7, 20, 2, None),
    (3, 70, 20, 4, 2),     # 3 forward / 5 backward token blocks, the last partial; batch groups of 2 (the last short)
    (1, 70, 20, 2, None),
    (2, 7, 150, 4, None),  # two channel blocks, the second partial
    (1, 20, 5, 8, None),   # the largest K
]


@pytest.mark.parametrize("batch,L,E,K,bpp", CASES)
def test_fp32_matches_float64_reference(batch, L, E, K, bpp):
    base, weight, bias = make_inputs(batch, L, E, K)
    du = torch.randn(2, batch, L, E, generator=torch.Generator().manual_seed(1))
    ref = reference(base, weight, bias, E, du)
    got = run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, E, du, batch_per_program=bpp)
    u = got[0]
    assert u.shape == (2, batch, L, E) and u.is_contiguous() and u.dtype == torch.float32
    for name, g, r in zip(("u", "dx", "dweight", "dbias"), got, ref):
        assert g.shape == r.shape, name
        assert_close(name, g, r)


def test_channel_major_view():
    """Any strides: x as a transposed (batch, E, L) tensor (channels strided, tokens contiguous)."""
    batch, L, E, K = 2, 19, 7, 4
    base, weight, bias = make_inputs(batch, L, E, K, layout="channel_major")
    du = torch.randn(2, batch, L, E, generator=torch.Generator().manual_seed(1))
    ref = reference(base, weight, bias, E, du, layout="channel_major")
    got = run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, E, du, layout="channel_major")
    for name, g, r in zip(("u", "dx", "dweight", "dbias"), got, ref):
        assert_close(name, g, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_reference_error(dtype):
    """STYLE 9: the kernel's error against float64 is at most 2x that of the reference run on the same low-precision
    input (fp32 arithmetic, outputs rounded once), plus a small atol."""
    batch, L, E, K = 3, 40, 20, 4
    base, weight, bias = make_inputs(batch, L, E, K, dtype=dtype)
    du = torch.randn(2, batch, L, E, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = reference(base, weight, bias, E, du)
    low = run(bidirectional_conv1d_silu_ref, base, weight, bias, E, du)
    got = run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, E, du, batch_per_program=2)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, g, lo, r in zip(("u", "dx", "dweight", "dbias"), got, low, ref):
        assert rel_err(g, r) <= 2 * rel_err(lo, r) + 1e-3, (name, rel_err(g, r), rel_err(lo, r))
    # rounded to nearest as torch rounds (the interpreter's own conversion truncates bf16): fp32 results that differ
    # only in summation order round to the same value almost always
    for name, g, lo in zip(("u", "dx"), got, low):
        assert (g == lo).double().mean() > 0.9, name


def test_every_access_inside_the_tensors():
    """Forward and backward touch only their tensors' memory (a stray access faults on the GPU): x a view of the
    first half of the in_proj output, a partial channel block, a partial last token block."""
    base, weight, bias = make_inputs(2, 70, 40, 4, dtype=torch.bfloat16)
    du = torch.randn(2, 2, 70, 40, generator=torch.Generator().manual_seed(1))
    with interpreter_bounds_check():
        run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, 40, du)


def test_deterministic_and_no_grad_path():
    batch, L, E, K = 3, 20, 20, 4
    base, weight, bias = make_inputs(batch, L, E, K)
    du = torch.randn(2, batch, L, E, generator=torch.Generator().manual_seed(1))
    first = run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, E, du, batch_per_program=2)
    second = run(ct.bidirectional_conv1d_silu_triton, base, weight, bias, E, du, batch_per_program=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(ct.bidirectional_conv1d_silu_triton(base[..., :E], weight, bias), first[0])


def test_dispatch_through_kernels_package():
    base, weight, bias = make_inputs(2, 9, 5, 4)
    x = base[..., :5]
    torch.testing.assert_close(kernels.bidirectional_conv1d_silu(x, weight, bias, backend="triton"),
                               bidirectional_conv1d_silu_ref(x, weight, bias), rtol=1e-5, atol=1e-5)
    # on CPU the default backend is the reference
    assert torch.equal(kernels.bidirectional_conv1d_silu(x, weight, bias),
                       bidirectional_conv1d_silu_ref(x, weight, bias))
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.bidirectional_conv1d_silu(x, weight, bias, backend="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shapes,match", [
    (((2, 9), (2, 5, 4), (2, 5)), "x must be"),
    (((2, 9, 5), (2, 6, 4), (2, 5)), "weight must"),
    (((2, 9, 5), (1, 5, 4), (2, 5)), "weight must"),
    (((2, 9, 5), (2, 5), (2, 5)), "weight must"),
    (((2, 9, 5), (2, 5, 4), (5,)), "bias must"),
])
def test_wrong_shapes_raise(backend, shapes, match):
    x, weight, bias = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        kernels.bidirectional_conv1d_silu(x, weight, bias, backend=backend)


def test_triton_limits_raise():
    with pytest.raises(ValueError, match="K <= 8"):
        ct.bidirectional_conv1d_silu_triton(torch.zeros(1, 4, 3), torch.zeros(2, 3, 9), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="supports x in"):
        ct.bidirectional_conv1d_silu_triton(torch.zeros(1, 4, 3, dtype=torch.float64), torch.zeros(2, 3, 4),
                                            torch.zeros(2, 3))
