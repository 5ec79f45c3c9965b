"""The reference scan against a float64 naive loop, and its symmetries."""
import pytest
import torch
import torch.nn.functional as F

from kernels import bidirectional_scan


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    """Token-by-token loop of the documented math, in float64."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    _, batch, E, L = u.shape
    ys = []
    for d, order in ((0, range(L)), (1, range(L - 1, -1, -1))):
        h = torch.zeros(batch, E, A.shape[-1], dtype=torch.float64)
        y = torch.zeros(batch, E, L, dtype=torch.float64)
        for t in order:
            dt = F.softplus(delta[d, :, :, t] + delta_bias[d])
            h = torch.exp(dt.unsqueeze(-1) * A[d]) * h + (dt * u[d, :, :, t]).unsqueeze(-1) * B[d, :, None, :, t]
            y[:, :, t] = (h * C[d, :, None, :, t]).sum(-1) + D[d] * u[d, :, :, t]
        ys.append(y)
    return F.silu(z) * (ys[0] + ys[1]) / 2


def random_inputs(batch, E, L, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return [r(2, batch, E, L).to(dtype), (0.5 * r(2, batch, E, L)).to(dtype), -torch.rand(2, E, N, generator=g) * 4,
            r(2, batch, N, L).to(dtype), r(2, batch, N, L).to(dtype), r(2, E), r(batch, E, L).to(dtype), 0.3 * r(2, E)]


@pytest.mark.parametrize("L", [1, 7, 64, 65, 150])
def test_reference_matches_naive_loop(L):
    args = random_inputs(2, 5, L, 4, seed=L)
    y = bidirectional_scan(*args, backend="reference")
    ref = naive_scan(*args)
    assert y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_reference_gradients_match_naive_loop():
    args = [a.double().requires_grad_() for a in random_inputs(2, 3, 70, 4, seed=1)]
    y = bidirectional_scan(*args, backend="reference")
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    ref = naive_scan(*ref_args)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((y * w).sum(), args)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_args)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-9, atol=1e-10)


def saved_bytes(fn):
    """fn()'s result and the bytes of the distinct storages autograd keeps for its backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_reference_keeps_little_for_its_backward():
    """The recurrence's own backward keeps the decays and states, not the log-depth scan's intermediates
    (autograd through those kept ~20 state-sized tensors a direction)."""
    batch, E, L, N = 2, 32, 150, 8
    args = [a.double().requires_grad_() for a in random_inputs(batch, E, L, N, seed=4)]
    _, kept = saved_bytes(lambda: bidirectional_scan(*args, backend="reference"))
    state_bytes = 2 * batch * E * N * L * 8         # one (E, N, L) float64 tensor per direction
    assert kept < 4 * state_bytes


def test_reference_gradcheck():
    args = [a.double().requires_grad_() for a in random_inputs(1, 2, 5, 3, seed=2)]
    assert torch.autograd.gradcheck(lambda *a: bidirectional_scan(*a, backend="reference"), args)


def test_reversal_symmetry():
    """Reversing the tokens and swapping the two directions' parameters reverses the output."""
    u, delta, A, B, C, D, z, bias = random_inputs(2, 4, 33, 4, seed=3)
    y = bidirectional_scan(u, delta, A, B, C, D, z, bias, backend="reference")
    swap = lambda t: t.flip(0)
    rev = lambda t: t.flip(-1)
    y_rev = bidirectional_scan(swap(rev(u)), swap(rev(delta)), swap(A), swap(rev(B)), swap(rev(C)), swap(D), rev(z),
                               swap(bias), backend="reference")
    assert torch.allclose(y_rev, rev(y), atol=1e-5)


def test_low_precision_output_dtype():
    args = random_inputs(1, 3, 9, 4, dtype=torch.bfloat16)
    y = bidirectional_scan(*args, backend="reference")
    assert y.dtype == torch.bfloat16
    ref = naive_scan(*args)
    assert ((y.double() - ref).norm() / ref.norm()) < 3e-2


def test_shape_errors_and_unknown_backend():
    args = random_inputs(1, 3, 9, 4)
    with pytest.raises(ValueError, match="z must have shape"):
        bidirectional_scan(*args[:6], args[6][..., :5], args[7], backend="reference")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        bidirectional_scan(*args, backend="cuda-magic")
