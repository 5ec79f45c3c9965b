"""Kernels of Vim's mixer: the bidirectional (and K-directional) selective scan and the bidirectional depthwise
conv1d + SiLU.
Functions on tensors only: no parameters, no imports from the rest of the project."""

from .conv_ref import bidirectional_conv1d_silu_ref
from .scan_ref import bidirectional_scan_ref, multidirectional_scan_ref, selective_scan_ref

__all__ = ["bidirectional_scan", "bidirectional_scan_ref", "multidirectional_scan", "multidirectional_scan_ref",
           "selective_scan_ref", "bidirectional_conv1d_silu", "bidirectional_conv1d_silu_ref", "available_backends"]


def available_backends():
    """Backends usable in this process: "reference" always, "triton" when the Triton kernels import."""
    backends = ["reference"]
    try:
        from . import conv_triton, scan_triton  # noqa: F401
        backends.append("triton")
    except ImportError:
        pass
    return backends


def bidirectional_scan(u, delta, A, B, C, D, z, delta_bias, backend=None, save_states=True):
    """Bidirectional selective scan of Vim's v2 mixer, both directions in one call.

    Args:
        u, delta: (2, batch, E, L); index 0 is the forward direction, 1 the backward one, both in the
            ORIGINAL token order (the backward direction is read from the end by the scan itself).
        A: (2, E, N), negative (A = -exp(A_log)).
        B, C: (2, batch, N, L).
        D, delta_bias: (2, E).
        z: (batch, E, L), the gate shared by both directions.
        backend: "reference" (pure PyTorch), "triton" (fused kernel) or None (triton on CUDA, else reference).
        save_states: Triton backend, when gradients are needed: the forward keeps the states its backward would
            otherwise recompute (8 bytes a channel and token: a faster backward for more activation memory).
    Returns:
        y: (batch, E, L) in u's dtype, y = silu(z) * (y_fwd + y_bwd) / 2 with, per direction,
        dt = softplus(delta + delta_bias), h_t = exp(dt_t A) h_prev + dt_t B_t u_t, y_t = <h_t, C_t> + D u_t.
    """
    backend = _resolve_backend(backend, u)
    if backend == "reference":
        return bidirectional_scan_ref(u, delta, A, B, C, D, z, delta_bias)
    from .scan_triton import bidirectional_scan_triton
    return bidirectional_scan_triton(u, delta, A, B, C, D, z, delta_bias, save_states=save_states)


def multidirectional_scan(u, delta, A, B, C, D, z, delta_bias, orders, backend=None):
    """Selective scan along K directions, each visiting the tokens in its own order, in one call.

    Args:
        u, delta: (K, batch, E, L), every direction in the ORIGINAL token order.
        A: (K, E, N), negative (A = -exp(A_log)).
        B, C: (K, batch, N, L), original token order.
        D, delta_bias: (K, E).
        z: (batch, E, L), the gate shared by all directions.
        orders: integer (K, L), or (K, batch, L) for per-sample orders: direction k visits the token at position
            orders[k, t] at step t. Every row must be a permutation of 0..L-1 (checked for CPU tensors only).
        backend: "reference" (pure PyTorch), "triton" (fused kernel) or None (triton on CUDA, else reference).
    Returns:
        y: (batch, E, L) in u's dtype, y = silu(z) * mean_k(y_k), where y_k is the scan of `bidirectional_scan`'s
        forward direction run over direction k's visiting order and written back at the visited positions.
        With orders [arange(L), arange(L).flip(0)] it equals `bidirectional_scan`.
    """
    backend = _resolve_backend(backend, u)
    if backend == "reference":
        return multidirectional_scan_ref(u, delta, A, B, C, D, z, delta_bias, orders)
    from .scan_multidir_triton import multidirectional_scan_triton
    return multidirectional_scan_triton(u, delta, A, B, C, D, z, delta_bias, orders)


def bidirectional_conv1d_silu(x, weight, bias, backend=None):
    """Depthwise conv1d + SiLU of Vim's v2 mixer, both directions in one call, token-major in and out.

    Args:
        x: (batch, L, E), any strides (the model passes the first half of the in_proj output, a view).
        weight: (2, E, K); bias: (2, E); index 0 is the forward direction, 1 the backward one. Arithmetic in fp32.
        backend: "reference" (pure PyTorch), "triton" (fused kernel) or None (triton on CUDA, else reference).
    Returns:
        u: (2, batch, L, E) contiguous, in x's dtype, with zero padding outside 0..L-1:
        u[0, b, t] = silu(bias[0] + sum_k weight[0, :, k] x[b, t - (K-1) + k])   (causal: the reference's conv)
        u[1, b, t] = silu(bias[1] + sum_k weight[1, :, k] x[b, t + (K-1) - k])   (anti-causal: the reference's
        causal conv of the flipped sequence, written on the original order).
    """
    backend = _resolve_backend(backend, x)
    if backend == "reference":
        return bidirectional_conv1d_silu_ref(x, weight, bias)
    from .conv_triton import bidirectional_conv1d_silu_triton
    return bidirectional_conv1d_silu_triton(x, weight, bias)


def _resolve_backend(backend, t):
    if backend is None:
        return "triton" if t.is_cuda and "triton" in available_backends() else "reference"
    if backend not in ("reference", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'reference', 'triton' or None")
    return backend
