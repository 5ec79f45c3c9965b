"""Shape checks shared by every backend of `bidirectional_scan`, `multidirectional_scan` and
`bidirectional_conv1d_silu`."""
import torch


def check_scan_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Assert the documented shapes; returns (num_directions, batch, E, L, N)."""
    if u.dim() != 4:
        raise ValueError(f"u must be (directions, batch, E, L), got {tuple(u.shape)}")
    K, batch, E, L = u.shape
    N = A.shape[-1]
    expected = {
        "u": (u, (K, batch, E, L)),
        "delta": (delta, (K, batch, E, L)),
        "A": (A, (K, E, N)),
        "B": (B, (K, batch, N, L)),
        "C": (C, (K, batch, N, L)),
        "D": (D, (K, E)),
        "z": (z, (batch, E, L)),
        "delta_bias": (delta_bias, (K, E)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    return K, batch, E, L, N


def check_conv_inputs(x, weight, bias):
    """Assert the documented shapes of `bidirectional_conv1d_silu`; returns (batch, L, E, K)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, L, E), got {tuple(x.shape)}")
    batch, L, E = x.shape
    if weight.dim() != 3 or weight.shape[:2] != (2, E) or weight.shape[2] < 1:
        raise ValueError(f"weight must have shape (2, E={E}, K) with K >= 1, got {tuple(weight.shape)}")
    if tuple(bias.shape) != (2, E):
        raise ValueError(f"bias must have shape (2, {E}), got {tuple(bias.shape)}")
    return batch, L, E, weight.shape[2]


def check_orders(orders, K, batch, L, check_values=True):
    """orders: integer (K, L) or (K, batch, L) visit lists. Each row must be a permutation of 0..L-1; that is
    checked only for CPU tensors, since on a GPU it would cost a host synchronisation per call (and not with
    check_values=False: the custom operators' fakes, which hold no values)."""
    if orders.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"orders must be int32 or int64, got {orders.dtype}")
    if tuple(orders.shape) not in ((K, L), (K, batch, L)):
        raise ValueError(f"orders must have shape {(K, L)} or {(K, batch, L)}, got {tuple(orders.shape)}")
    if check_values and orders.device.type == "cpu" and not torch.equal(
            orders.sort(dim=-1).values, torch.arange(L, dtype=orders.dtype).expand(orders.shape)):
        raise ValueError("every row of orders must be a permutation of 0..L-1")
