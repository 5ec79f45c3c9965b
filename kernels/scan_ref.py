"""Reference bidirectional and multidirectional selective scans in plain PyTorch.

The specification and test oracle of the fused kernels: differentiable, any device and dtype
(arithmetic in fp32, or fp64 for fp64 inputs). Vectorised over directions, batch, E and N; the
recurrence over L runs as a log-depth (Hillis-Steele) scan inside chunks of `CHUNK` tokens with the
state carried from chunk to chunk, so the Python loop count is L / CHUNK * log2(CHUNK), not L.

The log-depth scan makes ~30 (..., E, N, chunk) intermediates that autograd would keep for the backward (4.4 GB an
image for a Vim-T forward at 224). Where a direction's (..., E, N, L) state tensor has more than `RECOMPUTE_ABOVE`
elements and gradients are on, each chunk is recomputed in the backward instead (torch.utils.checkpoint): what is
kept drops to the decay and input tensors (0.6 GB an image), for 10-35% more time; tiny shapes (the tests) keep all.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._checks import check_orders, check_scan_inputs

CHUNK = 64
RECOMPUTE_ABOVE = 1 << 16


def _linear_recurrence(decay, inp, h0):
    """h_t = decay_t * h_{t-1} + inp_t along the last dim, starting from h0.

    decay, inp: (..., T); h0: (...). Returns h: (..., T).
    """
    a, b = decay, inp
    T = a.shape[-1]
    step = 1
    while step < T:
        # compose each position with the one `step` before it: (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)
        a_prev = F.pad(a[..., :-step], (step, 0), value=1.0)
        b_prev = F.pad(b[..., :-step], (step, 0), value=0.0)
        b = a * b_prev + b
        a = a * a_prev
        step *= 2
    return a * h0.unsqueeze(-1) + b


def _scan_chunk(decay, inp, h0, C):
    """One chunk: outputs sum_n h_t * C_t (..., E, T) and the last state (..., E, N)."""
    hs = _linear_recurrence(decay, inp, h0)
    return (hs * C.unsqueeze(-3)).sum(-2), hs[..., -1].contiguous()  # a copy: a view would keep hs alive


def selective_scan_ref(u, delta, A, B, C, D, delta_bias, reverse):
    """One direction of the selective scan (no gate), arithmetic in fp32 (fp64 for fp64 inputs).

    u, delta: (..., E, L); A: (E, N) broadcastable; B, C: (..., N, L); D, delta_bias: (E,).
    reverse: scan t = L-1..0 instead of 0..L-1. Returns y: (..., E, L) in the compute dtype.
    """
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, B, C = (t.to(dtype) for t in (u, delta, B, C))
    A, D, delta_bias = (t.to(dtype) for t in (A, D, delta_bias))
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
    dt = F.softplus(delta + delta_bias.unsqueeze(-1))                      # (..., E, L)
    decay = torch.exp(dt.unsqueeze(-2) * A.unsqueeze(-1))                 # (..., E, N, L)
    inp = (dt * u).unsqueeze(-2) * B.unsqueeze(-3)                         # (..., E, N, L)
    h = torch.zeros(decay.shape[:-1], dtype=dtype, device=u.device)
    recompute = torch.is_grad_enabled() and decay.numel() > RECOMPUTE_ABOVE
    ys = []
    for start in range(0, u.shape[-1], CHUNK):
        chunk = (decay[..., start:start + CHUNK], inp[..., start:start + CHUNK], h, C[..., start:start + CHUNK])
        y, h = checkpoint(_scan_chunk, *chunk, use_reentrant=False) if recompute else _scan_chunk(*chunk)
        ys.append(y)
    y = torch.cat(ys, dim=-1) + D.unsqueeze(-1) * u
    return y.flip(-1) if reverse else y


def bidirectional_scan_ref(u, delta, A, B, C, D, z, delta_bias):
    """y = silu(z) * (y_fwd + y_bwd) / 2, shapes as in `kernels.bidirectional_scan`."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    y_fwd = selective_scan_ref(u[0], delta[0], A[0], B[0], C[0], D[0], delta_bias[0], reverse=False)
    y_bwd = selective_scan_ref(u[1], delta[1], A[1], B[1], C[1], D[1], delta_bias[1], reverse=True)
    zf = z.to(y_fwd.dtype)
    return (F.silu(zf) * (y_fwd + y_bwd) * 0.5).to(u.dtype)


def multidirectional_scan_ref(u, delta, A, B, C, D, z, delta_bias, orders):
    """y = silu(z) * mean over directions of y_k, shapes as in `kernels.multidirectional_scan`: each direction's
    inputs are gathered into its visiting order, scanned forward and scattered back."""
    K, batch, E, L, N = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    check_orders(orders, K, batch, L)
    ys = []
    for k in range(K):
        order = orders[k].to(u.device).long().expand(batch, L)
        along = [t.gather(-1, order.unsqueeze(1).expand(-1, t.shape[1], -1)) for t in (u[k], delta[k], B[k], C[k])]
        y = selective_scan_ref(*along[:2], A[k], *along[2:], D[k], delta_bias[k], reverse=False)
        ys.append(torch.zeros_like(y).scatter(-1, order.unsqueeze(1).expand(-1, E, -1), y))
    y = torch.stack(ys).mean(0)
    return (F.silu(z.to(y.dtype)) * y).to(u.dtype)
