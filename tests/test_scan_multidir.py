"""multidirectional_scan: the reference against a float64 token loop, the Triton kernel against the reference (forward
and every gradient), and the two-direction special case against bidirectional_scan.

The Triton kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), on
tiny shapes with small chunk sizes and checkpoint intervals so that every boundary of long sequences is crossed.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from helpers import interpreted_kernel_modules, interpreter_bounds_check  # noqa: E402
from kernels.scan_ref import multidirectional_scan_ref  # noqa: E402

_, md = interpreted_kernel_modules("kernels.scan_triton", "kernels.scan_multidir_triton")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# the tolerances of tests/test_scan_triton.py (VIM_SPEC), atol relative to the largest reference value
FWD_TOL = (6e-4, 2e-3)
GRAD_TOL = {"u": (1.2e-3, 4e-3), "delta": (3e-3, 2e-2), "A": (1e-3, 1e-3), "B": (6e-4, 2e-3), "C": (6e-4, 2e-3),
            "D": (1e-3, 1e-3), "z": (1e-3, 1e-3), "delta_bias": (1e-3, 1e-3)}


def make_inputs(K, batch, E, L, N, dtype=torch.float32, token_major=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    xs = [r(K, batch, E, L), r(K, batch, E, L, scale=0.5, shift=-1.0), -torch.exp(r(K, E, N, scale=0.5)),
          r(K, batch, N, L), r(K, batch, N, L), r(K, E), r(batch, E, L), r(K, E, scale=0.3)]
    for i in (0, 1, 3, 4, 6):   # u, delta, B, C, z in the low precision; A, D, bias stay fp32, as in the model
        xs[i] = xs[i].to(dtype)
        if token_major:         # what the model hands over: channels (and B/C states) contiguous
            xs[i] = xs[i].transpose(-1, -2).contiguous().transpose(-1, -2)
    return xs


def make_orders(K, L, batch=None, seed=1):
    """K random permutations of 0..L-1, (K, L), or per sample (K, batch, L)."""
    g = torch.Generator().manual_seed(seed)
    if batch is None:
        return torch.stack([torch.randperm(L, generator=g) for _ in range(K)])
    return torch.stack([torch.stack([torch.randperm(L, generator=g) for _ in range(batch)]) for _ in range(K)])


def loop_oracle(u, delta, A, B, C, D, z, delta_bias, orders):
    """The definition, one token at a time in float64: direction k visits orders[k, t] at step t."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    K, batch, E, L = u.shape
    y = torch.zeros(batch, E, L, dtype=torch.float64)
    for k in range(K):
        for b in range(batch):
            h = torch.zeros(E, A.shape[-1], dtype=torch.float64)
            for t in (orders[k] if orders.dim() == 2 else orders[k, b]).tolist():
                dt = F.softplus(delta[k, b, :, t] + delta_bias[k])
                h = torch.exp(dt[:, None] * A[k]) * h + (dt * u[k, b, :, t])[:, None] * B[k, b, :, t][None, :]
                y[b, :, t] += h @ C[k, b, :, t] + D[k] * u[k, b, :, t]
    return F.silu(z) * y / K


def run(fn, xs, grad_out, *args, **kw):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs, *args, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in xs]


def reference(xs, grad_out, orders):
    return run(multidirectional_scan_ref, [x.double() for x in xs], grad_out.double(), orders)


def assert_close(name, got, ref, rtol, atol):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item() + 1e-12,
                               msg=lambda m: f"{name}: {m}")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("K,batch,L,per_sample", [(1, 1, 1, False), (2, 3, 7, False), (4, 2, 9, True),
                                                  (3, 1, 70, False)])
def test_reference_matches_float64_loop(K, batch, L, per_sample):
    xs = make_inputs(K, batch, 5, L, 4)
    orders = make_orders(K, L, batch if per_sample else None)
    torch.testing.assert_close(multidirectional_scan_ref(*[x.double() for x in xs], orders), loop_oracle(*xs, orders),
                               rtol=1e-10, atol=1e-10)


CASES = [
    # K, batch, E, L, N, chunk_size, seg, per-sample orders
    (1, 1, 5, 1, 4, None, None, False),     # a single token
    (2, 3, 6, 7, 4, None, None, False),
    (4, 1, 5, 21, 4, 8, 3, False),          # 3 chunks, the last partial; 3-step checkpoint segments
    (4, 3, 5, 5, 4, None, None, True),      # every sample its own orders
    (1, 1, 7, 13, 16, 8, 2, False),         # N = 16, chunked
    (2, 1, 40, 6, 4, None, None, False),    # two channel blocks
]


@pytest.mark.parametrize("K,batch,E,L,N,chunk,seg,per_sample", CASES)
def test_triton_matches_reference(K, batch, E, L, N, chunk, seg, per_sample):
    xs = make_inputs(K, batch, E, L, N)
    orders = make_orders(K, L, batch if per_sample else None)
    grad_out = torch.randn(batch, E, L, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = reference(xs, grad_out, orders)
    out, grads = run(md.multidirectional_scan_triton, xs, grad_out, orders, chunk_size=chunk, seg=seg)
    assert out.dtype == torch.float32 and out.shape == (batch, E, L)
    assert_close("out", out, ref_out, *FWD_TOL)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == torch.float32, name
        assert_close(f"d{name}", g, rg, *GRAD_TOL[name])


def test_every_access_inside_the_tensors():
    """Forward and backward touch only their tensors' memory: a last chunk shorter than one checkpoint block (the
    backward once read past the order table there, which faulted on the GPU), per-sample orders, token-major bf16,
    a partial second channel block."""
    xs = make_inputs(2, 1, 40, 100, 16, dtype=torch.bfloat16, token_major=True)
    grad_out = torch.randn(1, 40, 100, generator=torch.Generator().manual_seed(2))
    with interpreter_bounds_check():  # chunks of 34, 34 and 32 steps: the last needs 2 of the 3 blocks of 16
        run(md.multidirectional_scan_triton, xs, grad_out, make_orders(2, 100, batch=1), chunk_size=34)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_directions_equal_bidirectional_scan(backend):
    L = 9
    xs = make_inputs(2, 2, 5, L, 4)
    orders = torch.stack([torch.arange(L), torch.arange(L).flip(0)])
    grad_out = torch.randn(2, 5, L, generator=torch.Generator().manual_seed(2))
    out, grads = run(kernels.multidirectional_scan, xs, grad_out, orders, backend=backend)
    ref_out, ref_grads = run(kernels.bidirectional_scan, xs, grad_out, backend=backend)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_token_major_within_twice_reference_error_and_deterministic(dtype):
    """STYLE 9: the kernel's error against an fp64 reference is at most 2x that of the reference run in the same low
    precision, plus a small atol; two runs give identical bits."""
    K, batch, E, L, N = 3, 1, 6, 13, 4
    xs = make_inputs(K, batch, E, L, N, dtype=dtype, token_major=True)
    orders = make_orders(K, L)
    grad_out = torch.randn(batch, E, L, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref_out, ref_grads = reference(xs, grad_out, orders)
    low_out, low_grads = run(multidirectional_scan_ref, xs, grad_out, orders)
    out, grads = run(md.multidirectional_scan_triton, xs, grad_out, orders, chunk_size=8)
    again, grads2 = run(md.multidirectional_scan_triton, xs, grad_out, orders, chunk_size=8)
    assert out.dtype == dtype
    assert rel_err(out, ref_out) <= 2 * rel_err(low_out, ref_out) + 2e-3
    for name, g, lg, rg, g2 in zip(NAMES, grads, low_grads, ref_grads, grads2):
        assert g.dtype == xs[NAMES.index(name)].dtype, name
        assert rel_err(g, rg) <= 2 * rel_err(lg, rg) + 2e-3, (name, rel_err(g, rg), rel_err(lg, rg))
        assert torch.equal(g, g2), name
    assert torch.equal(out, again)
    with torch.no_grad():
        assert torch.equal(md.multidirectional_scan_triton(*xs, orders, chunk_size=8), out)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_orders_are_refused(backend):
    xs = make_inputs(2, 1, 5, 6, 4)
    for orders, message in [(torch.stack([torch.arange(6)] * 3), "shape"),
                            (torch.zeros(2, 6, dtype=torch.long), "permutation"),
                            (torch.stack([torch.arange(6)] * 2).float(), "int")]:
        with pytest.raises(ValueError, match=message):
            kernels.multidirectional_scan(*xs, orders, backend=backend)
