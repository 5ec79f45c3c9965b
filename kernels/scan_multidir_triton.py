"""Fused multidirectional selective scan in Triton: K directions, each visiting the tokens in its own order.

Direction k visits at step t the token at position orders[k, t] (orders (K, L), or (K, batch, L) for per-sample
orders such as MAE's visible subsets); every input and output stays in the original token order, so the order
is only index arithmetic: each step reads its token's position from the order table and loads / stores there
(no gathered or permuted copies of the scan inputs). y = silu(z) * mean_k(y_k).

What is fused, and how it differs from the two-direction kernel (scan_triton.py, which `bidirectional_scan` keeps
using unchanged)
- Forward: one program (one warp: 32 channels, one batch row, one direction, one token chunk) walks its direction's
  order with the fp32 state in registers as an [N, channels] tile, fusing softplus(delta + bias), exp(dt A) and the
  D skip, and stores y_k in fp32 at the visited positions. Orders are arbitrary, so directions cannot meet in one
  program as the two-direction kernel's do: a second, elementwise kernel averages the K rows and applies the gate
  (and saves the mean for dz).
- Long sequences are cut into chunks of scan steps with carried states, as in scan_triton.py (the same chunk
  combine kernel, the same chunk-count rule counting one program per direction).
- Backward: an elementwise kernel turns dout into dy = dout silu(z) / K (shared by every direction) and dz; then one
  program per (direction, chunk, batch row, 32 channels) recomputes states from checkpoints exactly as the
  two-direction backward does (level-1 checkpoints every CK steps, level-2 every SEG steps, a register stash of SEG
  states walked backwards), with token positions read from the order table. Deterministic: no atomics; sums over
  channels, batch and chunks are written per program and summed with torch.
- Token positions are prefetched one step ahead of the loads they address (the loops are latency-bound).

Known limits: those of scan_triton.py (N <= 32, fp32 arithmetic); orders must be permutations of 0..L-1 (checked
for CPU tensors only); the depthwise conv1d that precedes the scan is not fused here.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import scan_triton as st
from ._checks import check_orders, check_scan_inputs
from .scan_triton import (LN2, LOG2E, _add2, _cast, _chunk_combine_kernel, _exp2, _fwd_load, _fwd_step, _col_sum,
                          _col_sum_rows, _load_n, _sigmoid, _softplus)

__all__ = ["multidirectional_scan_triton"]


# ----------------------------------------------------------------------------------------------------------------------
# forward, pass 1: per-chunk end state from a zero start (only for chunked sequences)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["zero"])
def _md_fwd_chunk_state_kernel(
    # pointers
    u_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, ord_ptr, hloc_ptr, P_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    so_d, so_b,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    pid2 = tl.program_id(2)
    d = pid2 // (nchunks - 1)
    c = pid2 % (nchunks - 1)                # every direction needs the end states of chunks 0..n-2
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    d64 = d.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)

    ne_off = zero + n[:, None] * E + e[None, :]            # [N, E] tiles, channels over lanes (see scan_triton.py)
    A2 = tl.load(A_ptr + d64 * N * E + ne_off, mask=m2, other=0.0) * LOG2E
    bias = tl.load(bias_ptr + d * E + e, mask=me, other=0.0)
    o_p = ord_ptr + d64 * so_d + b64 * so_b + t0
    u_p = u_ptr + d64 * su_d + b64 * su_b + e * su_e
    d_p = dl_ptr + d64 * sd_d + b64 * sd_b + e * sd_e
    B_p = B_ptr + d64 * sB_d + b64 * sB_b + n * sB_n

    h = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dtsum = tl.zeros([BLOCK_E], tl.float32)
    t = tl.load(o_p)
    u = tl.load(u_p + t * su_l, mask=me, other=0.0).to(tl.float32)
    x = tl.load(d_p + t * sd_l, mask=me, other=0.0).to(tl.float32)
    Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
    tn = tl.load(o_p + tl.minimum(1, T - 1))
    for p in range(0, T):
        un = tl.load(u_p + tn * su_l, mask=me, other=0.0).to(tl.float32)
        xn = tl.load(d_p + tn * sd_l, mask=me, other=0.0).to(tl.float32)
        Bn = _load_n(B_p + tn * sB_l, mn, EVEN_N)
        tnn = tl.load(o_p + tl.minimum(p + 2, T - 1))
        dt = _softplus(x + bias, FAST)
        dtsum += dt
        h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * Bt[:, None]
        u, x, Bt, tn = un, xn, Bn, tnn
    off = ((d64 * batch + b) * nchunks + c) * N * E + ne_off
    tl.store(hloc_ptr + off, h, mask=m2)
    tl.store(P_ptr + off, tl.exp2(dtsum[None, :] * A2), mask=m2)


# ----------------------------------------------------------------------------------------------------------------------
# forward, main pass: one direction per program, y_k stored in fp32 at the visited positions
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["zero"])
def _md_scan_fwd_kernel(
    # pointers
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, ord_ptr, hin_ptr, y_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    sC_d, sC_b, sC_n, sC_l,
    so_d, so_b,
    sy_d, sy_b, sy_e, sy_l,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr, HAS_CARRY: tl.constexpr,
    EVEN_N: tl.constexpr, FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    pid2 = tl.program_id(2)
    d = pid2 // nchunks
    c = pid2 % nchunks
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    d64 = d.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)

    ne_off = zero + n[:, None] * E + e[None, :]
    A2 = tl.load(A_ptr + d64 * N * E + ne_off, mask=m2, other=0.0) * LOG2E
    Dv = tl.load(D_ptr + d * E + e, mask=me, other=0.0)
    bias = tl.load(bias_ptr + d * E + e, mask=me, other=0.0)
    if HAS_CARRY:
        h = tl.load(hin_ptr + ((d64 * batch + b) * nchunks + c) * N * E + ne_off, mask=m2, other=0.0)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    o_p = ord_ptr + d64 * so_d + b64 * so_b + t0
    u_p = u_ptr + d64 * su_d + b64 * su_b + e * su_e
    d_p = dl_ptr + d64 * sd_d + b64 * sd_b + e * sd_e
    B_p = B_ptr + d64 * sB_d + b64 * sB_b + n * sB_n
    C_p = C_ptr + d64 * sC_d + b64 * sC_b + n * sC_n
    y_p = y_ptr + d64 * sy_d + b64 * sy_b + e * sy_e

    t = tl.load(o_p)
    u, x, Bt, Ct = _fwd_load(u_p + t * su_l, d_p + t * sd_l, B_p + t * sB_l, C_p + t * sC_l, me, mn, EVEN_N)
    tn = tl.load(o_p + tl.minimum(1, T - 1))
    for p in range(0, T):
        un, xn, Bn, Cn = _fwd_load(u_p + tn * su_l, d_p + tn * sd_l, B_p + tn * sB_l, C_p + tn * sC_l, me, mn, EVEN_N)
        tnn = tl.load(o_p + tl.minimum(p + 2, T - 1))
        h, y = _fwd_step(h, A2, Dv, bias, u, x, Bt, Ct, LOG_N, FAST)
        tl.store(y_p + t * sy_l, y, mask=me)
        u, x, Bt, Ct, t, tn = un, xn, Bn, Cn, tn, tnn


# ----------------------------------------------------------------------------------------------------------------------
# elementwise: forward gate and mean over directions; backward dy (shared by the directions) and dz
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _md_gate_fwd_kernel(
    # pointers
    y_ptr, z_ptr, out_ptr, ym_ptr,
    # dimensions
    E, L, K,
    # strides
    sy_d, sy_b, sy_e, sy_l,
    sz_b, sz_e, sz_l,
    so_b, so_e, so_l,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, SAVE_YMEAN: tl.constexpr, FAST: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E))[:, None]
    l = (tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
    m = (e < E) & (l < L)
    y_p = y_ptr + b * sy_b + e * sy_e + l * sy_l
    s = tl.zeros([BLOCK_E, BLOCK_L], tl.float32)
    for _ in range(0, K):
        s += tl.load(y_p, mask=m, other=0.0)
        y_p += sy_d
    ym = s / K
    zz = tl.load(z_ptr + b * sz_b + e * sz_e + l * sz_l, mask=m, other=0.0).to(tl.float32)
    o = b * so_b + e * so_e + l * so_l
    tl.store(out_ptr + o, _cast(zz * _sigmoid(zz) * ym, out_ptr.dtype.element_ty, FAST), mask=m)
    if SAVE_YMEAN:
        tl.store(ym_ptr + o, _cast(ym, ym_ptr.dtype.element_ty, FAST), mask=m)


@triton.jit
def _md_gate_bwd_kernel(
    # pointers
    g_ptr, z_ptr, ym_ptr, dy_ptr, dz_ptr,
    # dimensions
    E, L, K,
    # strides
    sg_b, sg_e, sg_l,
    sz_b, sz_e, sz_l,
    sm_b, sm_e, sm_l,
    sy_b, sy_e, sy_l,
    sdz_b, sdz_e, sdz_l,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr, FAST: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E))[:, None]
    l = (tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]
    m = (e < E) & (l < L)
    g = tl.load(g_ptr + b * sg_b + e * sg_e + l * sg_l, mask=m, other=0.0).to(tl.float32)
    zz = tl.load(z_ptr + b * sz_b + e * sz_e + l * sz_l, mask=m, other=0.0).to(tl.float32)
    ym = tl.load(ym_ptr + b * sm_b + e * sm_e + l * sm_l, mask=m, other=0.0).to(tl.float32)
    sz = _sigmoid(zz)
    tl.store(dy_ptr + b * sy_b + e * sy_e + l * sy_l, g * zz * sz / K, mask=m)
    dz = g * ym * sz * (1.0 + zz * (1.0 - sz))
    tl.store(dz_ptr + b * sdz_b + e * sdz_e + l * sdz_l, _cast(dz, dz_ptr.dtype.element_ty, FAST), mask=m)


# ----------------------------------------------------------------------------------------------------------------------
# backward, pass 1: per-chunk adjoint carry from a zero end (only for chunked sequences)
# M_p = exp(dt_p A) v_p with v_p = C_p dy_p + M_{p+1} (p in scan steps); a chunk maps M_in -> R + P * M_in.
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["zero"])
def _md_bwd_chunk_state_kernel(
    # pointers
    dl_ptr, A_ptr, C_ptr, bias_ptr, dy_ptr, ord_ptr, R_ptr, P_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks,
    # strides
    sd_d, sd_b, sd_e, sd_l,
    sC_d, sC_b, sC_n, sC_l,
    sy_b, sy_e, sy_l,
    so_d, so_b,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    pid2 = tl.program_id(2)
    d = pid2 // (nchunks - 1)
    c = pid2 % (nchunks - 1) + 1            # every direction needs the adjoint carries of chunks 1..n-1
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    d64 = d.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)

    ne_off = zero + n[:, None] * E + e[None, :]
    A2 = tl.load(A_ptr + d64 * E * N + ne_off, mask=m2, other=0.0) * LOG2E
    bias = tl.load(bias_ptr + d * E + e, mask=me, other=0.0)
    o_p = ord_ptr + d64 * so_d + b64 * so_b + t0
    d_p = dl_ptr + d64 * sd_d + b64 * sd_b + e * sd_e
    C_p = C_ptr + d64 * sC_d + b64 * sC_b + n * sC_n
    y_p = dy_ptr + b64 * sy_b + e * sy_e

    M = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dtsum = tl.zeros([BLOCK_E], tl.float32)
    t = tl.load(o_p + T - 1)                 # walked from the chunk's last step
    x = tl.load(d_p + t * sd_l, mask=me, other=0.0).to(tl.float32)
    dy = tl.load(y_p + t * sy_l, mask=me, other=0.0)
    Ct = _load_n(C_p + t * sC_l, mn, EVEN_N)
    tn = tl.load(o_p + tl.maximum(T - 2, 0))
    for q in range(0, T):
        xn = tl.load(d_p + tn * sd_l, mask=me, other=0.0).to(tl.float32)
        dyn = tl.load(y_p + tn * sy_l, mask=me, other=0.0)
        Cn = _load_n(C_p + tn * sC_l, mn, EVEN_N)
        tnn = tl.load(o_p + tl.maximum(T - 3 - q, 0))
        dt = _softplus(x + bias, FAST)
        dtsum += dt
        M = tl.exp2(dt[None, :] * A2) * (Ct[:, None] * dy[None, :] + M)
        x, dy, Ct, tn = xn, dyn, Cn, tnn
    off = ((d64 * batch + b) * nchunks + c) * N * E + ne_off
    tl.store(R_ptr + off, M, mask=m2)
    tl.store(P_ptr + off, tl.exp2(dtsum[None, :] * A2), mask=m2)


# ----------------------------------------------------------------------------------------------------------------------
# backward, main pass (one direction per program, one warp, channels across the 32 lanes, all N in each lane)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _md_sweep(h, A2, bias, p_start, p_end, T, o_p, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn, ck, ck_off,
              y_p, sy_l, dC_p, mC, col, NN,
              EVERY: tl.constexpr, TILE: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr,
              WITH_DC: tl.constexpr, SCATTER: tl.constexpr, LOG_C: tl.constexpr):
    """Forward recurrence over scan steps [p_start, p_end), storing the state before every EVERY-th step (counted
    from p_start) to ck. WITH_DC: also dC_t = sum over channels of h_t * dy_t (this block's partial)."""
    t = tl.load(o_p + p_start)
    u = tl.load(u_p + t * su_l, mask=me, other=0.0).to(tl.float32)
    x = tl.load(d_p + t * sd_l, mask=me, other=0.0).to(tl.float32)
    Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
    tn = tl.load(o_p + tl.minimum(p_start + 1, T - 1))
    for p in range(p_start, p_end):
        if (p - p_start) % EVERY == 0:
            tl.store(ck + ((p - p_start) // EVERY) * TILE + ck_off, h)
        un = tl.load(u_p + tn * su_l, mask=me, other=0.0).to(tl.float32)
        xn = tl.load(d_p + tn * sd_l, mask=me, other=0.0).to(tl.float32)
        Bn = _load_n(B_p + tn * sB_l, mn, EVEN_N)
        tnn = tl.load(o_p + tl.minimum(p + 2, T - 1))
        dt = _softplus(x + bias, FAST)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * Bt[:, None]
        if WITH_DC:
            dy = tl.load(y_p + t * sy_l, mask=me, other=0.0)
            tl.store(dC_p + t * NN, _col_sum(h * dy[None, :], col, SCATTER, LOG_C), mask=mC)
        u, x, Bt, t, tn = un, xn, Bn, tn, tnn
    return h


@triton.jit(do_not_specialize=["zero"])
def _md_scan_bwd_kernel(
    # pointers: inputs
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, ord_ptr, hin_ptr, min_ptr, ck_ptr, ck2_ptr,
    # pointers: outputs
    du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    # dimensions
    batch, E, L, N, K, chunk, nchunks, nblk,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    sC_d, sC_b, sC_n, sC_l,
    sy_b, sy_e, sy_l,
    so_d, so_b,
    sgu_d, sgu_b, sgu_e, sgu_l,
    sgd_d, sgd_b, sgd_e, sgd_l,
    zero,
    # meta-parameters
    BLOCK_N: tl.constexpr, SCATTER: tl.constexpr, CK: tl.constexpr, SEG: tl.constexpr, HAS_CARRY: tl.constexpr,
    EVEN_N: tl.constexpr, FAST: tl.constexpr,
):
    BLOCK_E: tl.constexpr = 32
    LOG_C: tl.constexpr = 5
    NSUB: tl.constexpr = (CK + SEG - 1) // SEG
    TILE: tl.constexpr = BLOCK_E * BLOCK_N
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    pid2 = tl.program_id(2)
    n_eb = tl.num_programs(0)
    d = pid2 // nchunks
    c = pid2 % nchunks
    col = tl.arange(0, BLOCK_E)
    e = pid_e * BLOCK_E + col
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    d64 = d.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)

    ne_off = zero + n[:, None] * E + e[None, :]
    A2 = tl.load(A_ptr + d64 * E * N + ne_off, mask=m2, other=0.0) * LOG2E
    ck_off = zero + n[:, None] * BLOCK_E + col[None, :]
    Dv = tl.load(D_ptr + d * E + e, mask=me, other=0.0)
    bias = tl.load(bias_ptr + d * E + e, mask=me, other=0.0)
    cbase = ((d64 * batch + b) * nchunks + c) * N * E
    if HAS_CARRY:
        h = tl.load(hin_ptr + cbase + ne_off, mask=m2, other=0.0)
        M = tl.load(min_ptr + cbase + ne_off, mask=m2, other=0.0)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        M = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)

    o_p = ord_ptr + d64 * so_d + b64 * so_b + t0
    u_p = u_ptr + d64 * su_d + b64 * su_b + e * su_e
    d_p = dl_ptr + d64 * sd_d + b64 * sd_b + e * sd_e
    B_p = B_ptr + d64 * sB_d + b64 * sB_b + n * sB_n
    C_p = C_ptr + d64 * sC_d + b64 * sC_b + n * sC_n
    y_p = dy_ptr + b64 * sy_b + e * sy_e
    gu_p = du_ptr + d64 * sgu_d + b64 * sgu_b + e * sgu_e
    gd_p = ddl_ptr + d64 * sgd_d + b64 * sgd_b + e * sgd_e
    # private scratch of this program: level-1 checkpoints (one per CK steps) and level-2 (one per SEG steps of the
    # CK block being processed)
    prog = ((d64 * batch + b) * nchunks + c) * n_eb + pid_e
    ck = ck_ptr + prog * nblk * TILE
    ck2 = ck2_ptr + prog * NSUB * TILE

    # dB / dC partial sums of this channel block go to (n_eb, K, batch, L, N), reduce-scattered over the lanes as in
    # scan_triton.py (rows >= N are padding)
    nres = _col_sum_rows(n, col, SCATTER, LOG_C)
    part_off = ((pid_e.to(tl.int64) * K + d) * batch + b) * L * N + nres
    dB_p = dB_ptr + part_off
    dC_p = dC_ptr + part_off
    mBC = (nres < N) & ((col & ((1 << (LOG_C - SCATTER)) - 1)) == 0)[None, :]

    # phase 1: forward recurrence from the chunk's start state, a checkpoint before every CK steps
    h = _md_sweep(h, A2, bias, 0, T, T, o_p, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn, ck, ck_off,
                  y_p, sy_l, dC_p, mBC, col, N, CK, TILE, EVEN_N, FAST, False, SCATTER, LOG_C)

    # phase 2: CK blocks from the last; each is re-swept into level-2 checkpoints (producing dC on the way), then its
    # SEG-step sub-blocks are recomputed into registers and walked backwards (producing the rest)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dD_acc = tl.zeros([BLOCK_E], tl.float32)
    db_acc = tl.zeros([BLOCK_E], tl.float32)
    nblk_here = tl.cdiv(T, CK)  # a short last chunk has fewer blocks than the scratch is sized for
    for jbr in range(0, nblk_here):
        jb = nblk_here - 1 - jbr
        pb = jb * CK
        h = tl.load(ck + jb * TILE + ck_off)
        h = _md_sweep(h, A2, bias, pb, tl.minimum(pb + CK, T), T, o_p, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn,
                      ck2, ck_off, y_p, sy_l, dC_p, mBC, col, N, SEG, TILE, EVEN_N, FAST, True, SCATTER, LOG_C)
        nsub = tl.cdiv(tl.minimum(CK, T - pb), SEG)
        for jsr in range(0, nsub):
            js = nsub - 1 - jsr
            p0 = pb + js * SEG
            h = tl.load(ck2 + js * TILE + ck_off)
            ahs = ()
            dts = ()
            us = ()
            ts = ()
            for j in tl.static_range(SEG):
                valid = p0 + j < T
                mt = me & valid
                # past the chunk end: read a valid token (no masks on the [N] loads) but use dt = 0, u = 0, so
                # exp(dt A) = 1 and there is no input
                t = tl.load(o_p + tl.where(valid, p0 + j, 0))
                u = tl.load(u_p + t * su_l, mask=mt, other=0.0).to(tl.float32)
                x = tl.load(d_p + t * sd_l, mask=mt, other=0.0).to(tl.float32) + bias
                Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
                dt = tl.where(mt, _softplus(x, FAST), 0.0)
                ah = _exp2(dt[None, :] * A2, FAST) * h
                h = ah + (dt * u)[None, :] * Bt[:, None]
                ahs = ahs + (ah,)
                dts = dts + (dt,)
                us = us + (u,)
                ts = ts + (t,)
            for j in tl.static_range(SEG - 1, -1, -1):
                valid = p0 + j < T
                mt = me & valid
                t = ts[j]
                ah = ahs[j]
                dt = dts[j]
                u = us[j]
                Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
                Ct = _load_n(C_p + t * sC_l, mn, EVEN_N)
                dy = tl.load(y_p + t * sy_l, mask=mt, other=0.0)
                dtu = dt * u
                v = Ct[:, None] * dy[None, :] + M                       # dL/dh at this step
                q = v * ah                                               # v * exp(dt A) * h_prev
                vB, qA = tl.reduce((v * Bt[:, None], q * A2), 0, _add2)
                # d softplus / dx = sigmoid(x) = 1 - exp(-dt)
                ddl = tl.where(mt, (qA * LN2 + u * vB) * (1.0 - tl.exp2(-dt * LOG2E)), 0.0)
                dA_acc += q * dt[None, :]
                dD_acc += dy * u
                db_acc += ddl
                tl.store(gu_p + t * sgu_l, _cast(dt * vB + Dv * dy, du_ptr.dtype.element_ty, FAST), mask=mt)
                tl.store(gd_p + t * sgd_l, _cast(ddl, ddl_ptr.dtype.element_ty, FAST), mask=mt)
                tl.store(dB_p + t * N, _col_sum(v * dtu[None, :], col, SCATTER, LOG_C), mask=mBC & valid)
                M = _exp2(dt[None, :] * A2, FAST) * v
    # per-program partial sums over this chunk's steps: (batch * nchunks, K, N, E) and (batch * nchunks, K, E)
    row = (b64 * nchunks + c) * K + d
    tl.store(dA_ptr + row * E * N + ne_off, dA_acc, mask=m2)
    tl.store(dD_ptr + row * E + e, dD_acc, mask=me)
    tl.store(dbias_ptr + row * E + e, db_acc, mask=me)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
_GATE_BLOCK = 32         # elementwise kernels: [32 channels, 32 tokens] tiles


def _prep(u, delta, A, B, C, D, z, delta_bias, orders, check_values=True):
    K, batch, E, L, N = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    check_orders(orders, K, batch, L, check_values)
    if N > 32:
        raise ValueError(f"the Triton scan supports a state size N <= 32, got {N}")
    A = A.float().transpose(1, 2).contiguous()  # (K, N, E): the kernels' [N, E] tiles are channels-contiguous
    orders = orders.to(device=u.device, dtype=torch.int32).contiguous()
    order_strides = (orders.stride(0), orders.stride(1) if orders.dim() == 3 else 0)
    return (K, batch, E, L, N, A, D.float().contiguous(), delta_bias.float().contiguous(), st._bc_token_major(B),
            st._bc_token_major(C), orders, order_strides)


def _combine(S, P, X, rows, NE, nchunks, reverse):
    """The chunk carry over all (direction, batch) rows at once, every row in ascending scan steps (descending
    with reverse)."""
    BLOCK = 256
    _chunk_combine_kernel[(triton.cdiv(NE, BLOCK), rows, 1)](S, P, X, rows, NE, nchunks, REVERSE=reverse, BLOCK=BLOCK)


def _gate_grid(batch, E, L):
    return (triton.cdiv(E, _GATE_BLOCK), triton.cdiv(L, _GATE_BLOCK), batch)


def _chunk_length(u, chunk_size):
    """Scan steps per chunk (one direction per program); the backward cuts where the forward did."""
    K, batch, E, L = u.shape
    return st._chunking(K * batch, E, L, chunk_size, u.device)[0]


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size=None, save=False, launch=True):
    """Returns out (batch, E, L) in u's dtype; when `save`, also the mean over directions (u's dtype) and the chunk
    start states (K, batch, nchunks, N, E) fp32, each empty where unused. launch=False: allocation only (the custom
    op's fake, as in scan_triton._scan_fwd)."""
    K, batch, E, L, N, A, D, delta_bias, B, C, orders, so = _prep(u, delta, A, B, C, D, z, delta_bias, orders, launch)
    dev = u.device
    chunk = _chunk_length(u, chunk_size)
    nchunks = triton.cdiv(L, chunk)
    out = st._empty_like_layout(u, (batch, E, L), u.dtype)
    ymean = st._empty_like_layout(u, (batch, E, L), u.dtype) if save else u.new_empty(0)
    hin = torch.empty((K, batch, nchunks, N, E), dtype=torch.float32, device=dev) if nchunks > 1 else u.new_empty(0)
    if not launch:
        return out, ymean, hin
    BLOCK_E = 32
    BLOCK_N = triton.next_power_of_2(N)
    n_eb = triton.cdiv(E, BLOCK_E)
    ys = st._empty_like_layout(u, (K, batch, E, L), torch.float32)
    with st._device_ctx(u):
        if nchunks > 1:
            hloc = torch.empty_like(hin)
            P = torch.empty_like(hloc)
            _md_fwd_chunk_state_kernel[(n_eb, batch, K * (nchunks - 1))](
                u, delta, A, B, delta_bias, orders, hloc, P,
                batch, E, L, N, chunk, nchunks,
                *u.stride(), *delta.stride(), *B.stride(), *so, 0,
                BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N, EVEN_N=BLOCK_N == N, FAST=u.is_cuda, num_warps=1,
            )
            _combine(hloc, P, hin, K * batch, N * E, nchunks, reverse=False)
        _md_scan_fwd_kernel[(n_eb, batch, K * nchunks)](
            u, delta, A, B, C, D, delta_bias, orders, hin if nchunks > 1 else ys, ys,
            batch, E, L, N, chunk, nchunks,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *so, *ys.stride(), 0,
            BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N, LOG_N=BLOCK_N.bit_length() - 1, HAS_CARRY=nchunks > 1,
            EVEN_N=BLOCK_N == N, FAST=u.is_cuda, num_warps=1, **st._launch_opts(u, st._FWD_MAXNREG),
        )
        _md_gate_fwd_kernel[_gate_grid(batch, E, L)](
            ys, z, out, ymean if save else out, E, L, K, *ys.stride(), *z.stride(), *out.stride(),
            BLOCK_E=_GATE_BLOCK, BLOCK_L=_GATE_BLOCK, SAVE_YMEAN=save, FAST=u.is_cuda,
        )
    return out, ymean, hin


def _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin, chunk, seg=None, launch=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias), the parameters' in fp32; hin empty for one chunk.
    launch=False: allocation only."""
    K, batch, E, L, N, A, D, delta_bias, B, C, orders, so = _prep(u, delta, A, B, C, D, z, delta_bias, orders, launch)
    dev = u.device
    nchunks = triton.cdiv(L, chunk)
    SEG = seg or st._SEG
    CK = st._CK
    BLOCK_E = 32
    BLOCK_N = triton.next_power_of_2(N)
    n_eb = triton.cdiv(E, BLOCK_E)
    nblk = triton.cdiv(chunk, CK)
    f32 = torch.float32
    dz = st._empty_like_layout(z, tuple(z.shape), z.dtype)
    du = st._empty_like_layout(u, tuple(u.shape), u.dtype)
    ddelta = st._empty_like_layout(delta, tuple(delta.shape), delta.dtype)
    dB_part = torch.empty((n_eb, K, batch, L, N), dtype=f32, device=dev)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty((batch * nchunks, K, N, E), dtype=f32, device=dev)
    dD_part = torch.empty((batch * nchunks, K, E), dtype=f32, device=dev)
    db_part = torch.empty_like(dD_part)
    if launch:
        with st._device_ctx(u):
            dy = st._empty_like_layout(u, (batch, E, L), f32)
            _md_gate_bwd_kernel[_gate_grid(batch, E, L)](
                dout, z, ymean, dy, dz, E, L, K,
                *dout.stride(), *z.stride(), *ymean.stride(), *dy.stride(), *dz.stride(),
                BLOCK_E=_GATE_BLOCK, BLOCK_L=_GATE_BLOCK, FAST=u.is_cuda,
            )
            Min = None
            if nchunks > 1:
                R = torch.empty((K, batch, nchunks, N, E), dtype=f32, device=dev)
                P = torch.empty_like(R)
                _md_bwd_chunk_state_kernel[(n_eb, batch, K * (nchunks - 1))](
                    delta, A, C, delta_bias, dy, orders, R, P,
                    batch, E, L, N, chunk, nchunks,
                    *delta.stride(), *C.stride(), *dy.stride(), *so, 0,
                    BLOCK_E=32, BLOCK_N=BLOCK_N, EVEN_N=BLOCK_N == N, FAST=u.is_cuda, num_warps=1,
                )
                Min = torch.empty_like(R)
                _combine(R, P, Min, K * batch, N * E, nchunks, reverse=True)
            nprog = K * batch * nchunks * n_eb
            ck = torch.empty((nprog * nblk, BLOCK_E * BLOCK_N), dtype=f32, device=dev)
            ck2 = torch.empty((nprog * triton.cdiv(CK, SEG), BLOCK_E * BLOCK_N), dtype=f32, device=dev)
            _md_scan_bwd_kernel[(n_eb, batch, K * nchunks)](
                u, delta, A, B, C, D, delta_bias, dy, orders,
                hin if nchunks > 1 else ck, Min if Min is not None else ck, ck, ck2,
                du, ddelta, dB_part, dC_part, dA_part, dD_part, db_part,
                batch, E, L, N, K, chunk, nchunks, nblk,
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *dy.stride(), *so,
                *du.stride(), *ddelta.stride(),
                0,
                BLOCK_N=BLOCK_N, SCATTER=st._scatter_levels(BLOCK_N, BLOCK_E, 1), CK=CK, SEG=SEG,
                HAS_CARRY=nchunks > 1, EVEN_N=BLOCK_N == N, FAST=u.is_cuda, num_warps=1,
                **st._launch_opts(u, st._BWD_MAXNREG),
            )
    dB = dB_part.sum(0).transpose(-1, -2)
    dC = dC_part.sum(0).transpose(-1, -2)
    return du, ddelta, dA_part.sum(0).transpose(1, 2), dB, dC, dD_part.sum(0), dz, db_part.sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# autograd: a Function for eager calls, a custom operator under torch.compile (why: scan_triton.py)
# ----------------------------------------------------------------------------------------------------------------------
def _scan_grads(saved, dout, chunk, seg, backward):
    """Gradients of the 8 float tensor inputs, in their dtypes (orders has none)."""
    u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin = saved
    du, ddelta, dA, dB, dC, dD, dz, dbias = backward(dout, u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin,
                                                     chunk, seg)
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.to(D.dtype), dz,
            dbias.to(delta_bias.dtype))


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, seg):
        out, ymean, hin = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, save=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin)
        ctx.chunk, ctx.seg = _chunk_length(u, chunk_size), seg
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_scan_grads(ctx.saved_tensors, dout, ctx.chunk, ctx.seg, _scan_bwd), None, None, None


@torch.library.custom_op("vim::multidirectional_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor,
             orders: Tensor, chunk_size: Optional[int], seg: Optional[int], save: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean over directions, chunk start states); `seg` is the backward's."""
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, save)


@_scan_op.register_fake
def _scan_op_fake(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, seg, save):
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, save, launch=False)


@torch.library.custom_op("vim::multidirectional_scan_backward", mutates_args=())
def _scan_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                 delta_bias: Tensor, orders: Tensor, ymean: Tensor, hin: Tensor, chunk: int, seg: Optional[int]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin, chunk, seg)


@_scan_bwd_op.register_fake
def _scan_bwd_op_fake(dout, u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin, chunk, seg):
    return _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin, chunk, seg, launch=False)


def _scan_op_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, seg, save = inputs
    _, ymean, hin = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, orders, ymean, hin)
    ctx.chunk, ctx.seg, ctx.saved = _chunk_length(u, chunk_size), seg, save


def _scan_op_backward(ctx, dout, *_):
    if not ctx.saved:
        raise RuntimeError("backward through a scan run with save=False (no gradients were required then)")
    return *_scan_grads(ctx.saved_tensors, dout, ctx.chunk, ctx.seg, _scan_bwd_op), None, None, None, None


_scan_op.register_autograd(_scan_op_backward, setup_context=_scan_op_setup_context)


def multidirectional_scan_triton(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size=None, seg=None):
    """Fused multidirectional selective scan; same contract as `kernels.multidirectional_scan`.

    Args:
        u, delta: (K, batch, E, L), every direction in the original token order; any strides (token-major views,
            channels contiguous, are the fast layout).
        A: (K, E, N); B, C: (K, batch, N, L); D, delta_bias: (K, E); z: (batch, E, L).
        orders: int (K, L) or (K, batch, L); direction k visits position orders[k, t] at step t.
        chunk_size: scan steps per chunk (None: chosen from the shape); tests use small values to cross chunk borders.
        seg: backward checkpoint interval in steps (None: the two-direction kernel's default).
    Returns:
        (batch, E, L) in u's dtype: silu(z) * mean_k(y_k).
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    if torch.compiler.is_compiling():
        return _scan_op(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, seg, save)[0]
    if save:
        return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size, seg)
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, orders, chunk_size)[0]
