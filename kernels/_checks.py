"""Shape checks shared by every backend of `bidirectional_scan` and `bidirectional_conv1d_silu`."""


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
