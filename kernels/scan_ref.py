"""Reference bidirectional and multidirectional selective scans in plain PyTorch.

The specification and test oracle of the fused kernels: differentiable, any device and dtype
(arithmetic in fp32, or fp64 for fp64 inputs). Vectorised over directions, batch, E and N; the
recurrence over L runs as a log-depth (Hillis-Steele) scan inside chunks of `CHUNK` tokens with the
state carried from chunk to chunk, so the Python loop count is L / CHUNK * log2(CHUNK), not L.

The recurrence has its own backward (`_LinearRecurrence`), the same kind of scan run in reverse: autograd through
the log-depth scan would keep its ~20 intermediates of every chunk (4.4 GiB an image for a Vim-T step at 224); the
Function keeps the decays and the states only.
"""
import torch
import torch.nn.functional as F

from ._checks import check_orders, check_scan_inputs

CHUNK = 64


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


class _LinearRecurrence(torch.autograd.Function):
    """_linear_recurrence with a backward that keeps only decay and the states.

    With g the gradient of the loss with respect to h_t through all later states,
    g_t = dL/dh_t + decay_{t+1} g_{t+1}: the same recurrence run from the end. Then dL/dinp_t = g_t,
    dL/ddecay_t = g_t h_{t-1} (h_{-1} = h0) and dL/dh0 = decay_0 g_0.
    """

    @staticmethod
    def forward(ctx, decay, inp, h0):
        hs = _linear_recurrence(decay, inp, h0)
        ctx.save_for_backward(decay, hs, h0)
        return hs

    @staticmethod
    def backward(ctx, grad_hs):
        decay, hs, h0 = ctx.saved_tensors
        next_decay = F.pad(decay[..., 1:], (0, 1))                     # decay_{t+1}, 0 past the end
        g = _linear_recurrence(next_decay.flip(-1), grad_hs.flip(-1), torch.zeros_like(h0)).flip(-1)
        h_prev = torch.cat([h0.unsqueeze(-1), hs[..., :-1]], dim=-1)
        return g * h_prev, g, decay[..., 0] * g[..., 0]


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
    ys = []
    for start in range(0, u.shape[-1], CHUNK):
        sl = slice(start, start + CHUNK)
        hs = _LinearRecurrence.apply(decay[..., sl], inp[..., sl], h)
        ys.append((hs * C[..., sl].unsqueeze(-3)).sum(-2))
        h = hs[..., -1]
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
