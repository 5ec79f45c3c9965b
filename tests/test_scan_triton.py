"""Triton bidirectional scan vs the float64 reference, forward and all gradients.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported), so CI needs no GPU.
Shapes are tiny (the interpreter executes every program in numpy); chunk sizes and checkpoint intervals are passed
small so that every boundary the GPU sees at long sequences is crossed here too.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language

import kernels  # noqa: E402
from helpers import interpreted_kernel_modules, interpreter_bounds_check  # noqa: E402
from kernels.scan_ref import bidirectional_scan_ref  # noqa: E402

st, = interpreted_kernel_modules("kernels.scan_triton")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# VIM_SPEC tolerances (fp32 vs an fp32 reference): forward rtol 6e-4 / atol 2e-3; gradients du 2x, ddelta 5x rtol and
# 10x atol; dA, dD, dz, ddelta_bias 1e-3. atol is taken relative to the largest reference value.
FWD_TOL = (6e-4, 2e-3)
GRAD_TOL = {"u": (1.2e-3, 4e-3), "delta": (3e-3, 2e-2), "A": (1e-3, 1e-3), "B": (6e-4, 2e-3), "C": (6e-4, 2e-3),
            "D": (1e-3, 1e-3), "z": (1e-3, 1e-3), "delta_bias": (1e-3, 1e-3)}


def _token_major(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def make_inputs(batch, E, L, N, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    u = r(2, batch, E, L)
    delta = r(2, batch, E, L, scale=0.5, shift=-1.0)
    A = -torch.exp(r(2, E, N, scale=0.5))
    B = r(2, batch, N, L)
    C = r(2, batch, N, L)
    D = r(2, E)
    z = r(batch, E, L)
    bias = r(2, E, scale=0.3)
    u, delta, B, C, z = (t.to(dtype) for t in (u, delta, B, C, z))  # A, D, bias stay fp32, as in the model
    if layout == "token_major":  # what the model hands over: channels (and B/C states) contiguous
        u, delta, B, C, z = (_token_major(t) for t in (u, delta, B, C, z))
    elif layout == "strided":  # every tensor a non-contiguous slice of a bigger one
        u, delta, B, C, z = (torch.cat([t, t], dim=-1)[..., ::2] for t in (u, delta, B, C, z))
        u = _token_major(u)
    return [u, delta, A, B, C, D, z, bias]


def run(fn, xs, grad_out, **kw):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in xs]


def reference(xs, grad_out, dtype=torch.float64):
    return run(bidirectional_scan_ref, [x.to(dtype) if x.is_floating_point() else x for x in xs], grad_out)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(name, got, ref, rtol, atol):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item() + 1e-12,
                               msg=lambda m: f"{name}: {m}")


CASES = [
    # batch, E, L, N, chunk_size, seg
    (1, 5, 1, 4, None, None),
    (3, 12, 7, 4, None, None),
    (1, 12, 64, 16, None, None),
    (1, 5, 197, 4, None, None),
    (2, 12, 37, 4, 8, 3),    # chunked: 5 chunks, the last partial; 3-token checkpoint segments
    (1, 40, 21, 4, 16, 2),   # two channel blocks; chunk of 16 = one level-1 checkpoint block
    (3, 7, 50, 16, 24, None),
]


@pytest.mark.parametrize("batch,E,L,N,chunk,seg", CASES)
def test_fp32_matches_float64_reference(batch, E, L, N, chunk, seg):
    xs = make_inputs(batch, E, L, N)
    grad_out = torch.randn(batch, E, L, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = reference(xs, grad_out)
    out, grads = run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=chunk, seg=seg)
    assert out.dtype == torch.float32 and out.shape == (batch, E, L)
    assert_close("out", out, ref_out, *FWD_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == xs[NAMES.index(name)].dtype, name
        assert_close(f"d{name}", g, rg, *GRAD_TOL[name])


@pytest.mark.parametrize("block_e", [8, 16])
@pytest.mark.parametrize("batch,E,L,N,chunk,seg",
                         [(1, 40, 21, 16, 16, 2), (1, 12, 19, 4, 8, 3), (1, 33, 18, 32, 16, None)])
def test_backward_channel_block_widths(monkeypatch, block_e, batch, E, L, N, chunk, seg):
    """The backward with 8 or 16 channels a program (the default is 32): a channel's N states split over 4 or 2 lanes,
    so other reduce-scatter levels for dB / dC."""
    monkeypatch.setattr(st, "_BWD_BLOCK_E", block_e)
    test_fp32_matches_float64_reference(batch, E, L, N, chunk, seg)


def test_saved_states_equal_recomputed_ones(monkeypatch):
    """The forward keeping the backward's level-1 checkpoints (save_states, the default) gives bitwise the gradients
    of the backward recomputing them, with every fresh buffer poisoned (a checkpoint not written would show as NaN):
    chunked, the last chunk shorter than a checkpoint block, a partial second channel block."""
    def poisoned_empty(*args, **kwargs):
        t = torch_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch_empty = torch.empty
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    xs = make_inputs(1, 40, 25, 4)
    grad_out = torch.randn(1, 40, 25, generator=torch.Generator().manual_seed(1))
    saved = run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=18, save_states=True)   # 18 + 7 tokens
    recomputed = run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=18, save_states=False)
    for name, a, b in zip(("out",) + NAMES, (saved[0], *saved[1]), (recomputed[0], *recomputed[1])):
        assert torch.isfinite(a).all() and torch.equal(a, b), name


@triton.jit
def _copy_kernel(x_ptr, out_ptr, n, read, BLOCK: tl.constexpr):
    """out[:n] = x[:n], loading the first `read` elements of x (read > n loads past x's end)."""
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < read, other=0.0), mask=i < n)


def test_bounds_check_catches_a_stray_load():
    """The check behind the test below is live: one element read past a tensor's end is caught, the same kernel
    reading only its tensor passes."""
    x, out = torch.arange(5.0), torch.empty(5)
    with interpreter_bounds_check():
        _copy_kernel[(1,)](x, out, 5, 5, BLOCK=8)
    assert torch.equal(out, x)
    with pytest.raises(Exception, match="_copy_kernel: load outside its tensors on 1 lanes"):
        with interpreter_bounds_check():
            _copy_kernel[(1,)](x, out, 5, 6, BLOCK=8)


def test_every_access_inside_the_tensors():
    """Forward and backward touch only their tensors' memory (a stray access faults on the GPU): a last chunk
    shorter than one checkpoint block, token-major bf16, a partial second channel block."""
    xs = make_inputs(1, 40, 100, 16, dtype=torch.bfloat16, layout="token_major")
    grad_out = _token_major(torch.randn(1, 40, 100, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16))
    with interpreter_bounds_check():  # chunks of 34, 34 and 32 tokens: the last needs 2 of the 3 blocks of 16
        run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=34)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_low_precision_within_twice_reference_error(dtype, layout):
    """STYLE 9: the kernel's error against an fp64 reference is at most 2x that of the reference run in the same low
    precision, plus a small atol (the reference computes in fp32 and rounds its outputs)."""
    batch, E, L, N = 2, 12, 45, 16
    xs = make_inputs(batch, E, L, N, dtype=dtype, layout=layout)
    grad_out = torch.randn(batch, E, L, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref_out, ref_grads = reference(xs, grad_out)
    low_out, low_grads = run(bidirectional_scan_ref, xs, grad_out)
    out, grads = run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=16)
    assert out.dtype == dtype
    atol = 2e-3
    assert rel_err(out, ref_out) <= 2 * rel_err(low_out, ref_out) + atol
    for name, g, lg, rg in zip(NAMES, grads, low_grads, ref_grads):
        assert g.dtype == xs[NAMES.index(name)].dtype, name
        assert rel_err(g, rg) <= 2 * rel_err(lg, rg) + atol, (name, rel_err(g, rg), rel_err(lg, rg))


@pytest.mark.parametrize("layout", ["token_major", "strided"])
def test_strided_inputs(layout):
    batch, E, L, N = 2, 9, 23, 4
    xs = make_inputs(batch, E, L, N, layout=layout)
    grad_out = _token_major(torch.randn(batch, E, L, generator=torch.Generator().manual_seed(1)))
    ref_out, ref_grads = reference(xs, grad_out)
    out, grads = run(st.bidirectional_scan_triton, xs, grad_out, chunk_size=8)
    assert_close("out", out, ref_out, *FWD_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert_close(f"d{name}", g, rg, *GRAD_TOL[name])


def test_no_grad_path_and_determinism():
    xs = make_inputs(2, 12, 19, 4)
    with torch.no_grad():
        a = st.bidirectional_scan_triton(*xs, chunk_size=8)
        b = st.bidirectional_scan_triton(*xs, chunk_size=8)
    c, grads1 = run(st.bidirectional_scan_triton, xs, torch.ones(2, 12, 19), chunk_size=8)
    _, grads2 = run(st.bidirectional_scan_triton, xs, torch.ones(2, 12, 19), chunk_size=8)
    assert torch.equal(a, b) and torch.equal(a, c)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


def test_dispatch_through_kernels_package():
    assert "triton" in kernels.available_backends()
    xs = make_inputs(1, 5, 9, 4)
    torch.testing.assert_close(kernels.bidirectional_scan(*xs, backend="triton"),
                               bidirectional_scan_ref(*xs), rtol=6e-4, atol=2e-3)
