"""Fused bidirectional selective scan (Vim v2 mixer) in Triton: forward, backward, autograd (a Function, and a
custom operator for torch.compile).

What is fused
- Forward: ONE launch covers both directions. A program (one warp) owns (32 channels, batch row, token chunk) and
  walks the chunk with two independent recurrences at once: the forward direction from the chunk's first token and
  the backward direction from its last, each reading its inputs by index arithmetic (no flip copies). softplus(delta
  + bias), exp(dt A), the D skip, the silu(z) gate and the average of the directions are fused: in the first half of
  the walk each direction parks its y in an fp32 scratch row, in the second half it meets the other direction's parked
  value and the program writes out = silu(z) (y_fwd + y_bwd) / 2 (and y_fwd + y_bwd in u's dtype, saved for dz).
  State is fp32 in registers as an [N, channels] tile: channels over the 32 lanes, all N of a channel in one lane
  (reductions over N stay in-thread; a token's loads are coalesced for token-major inputs). Any strides are accepted.
  The loop is bound by load latency: every sequential loop prefetches its inputs a few tokens ahead into L1
  (`_prefetch`, no registers), loads the small per-channel values a token ahead and computes dt a token ahead.
- Long sequences are cut into chunks processed in parallel (only as far as needed to fill the GPU once, and never
  below 256 tokens): `_fwd_chunk_state_kernel` scans each chunk from a zero state (end state, exp(A sum dt); both
  directions of a chunk in one program), `_chunk_combine_kernel` carries states across chunks, the main kernel
  starts from the carried state.
- Backward (one direction per program): gradients of u, delta, A, B, C, D, z and delta_bias. It needs h_{t-1} while
  walking t backwards; reversing the recurrence divides by exp(dt A) (unstable) and storing every h is an (E, N, L)
  tensor, so states are recomputed: level-1 checkpoints, the state every CK tokens, come from the training forward
  (`save_states`, the default: 8 bytes a channel and token for both directions) or else from a first sweep of the
  backward (phase 1); each CK block is then re-swept (also producing dC) into level-2 checkpoints every SEG tokens (a
  small scratch rewritten per block, so it stays in L1/L2); each SEG segment is recomputed into registers (a
  constexpr-unrolled tuple) and walked backwards with the adjoint v_t = C_t dy_t + exp(dt_{t+1} A) v_{t+1}.
  Chunk-boundary adjoints come from `_bwd_chunk_state_kernel` + the combine kernel. Besides the level-1 checkpoints
  the forward saves y_fwd + y_bwd and, for chunked sequences without them, the chunk start states (N x E per chunk).
- dB and dC are sums over channels, i.e. across the 32 lanes, per token: a butterfly reduce-scatter (`_col_sum`,
  tl.split + a lane-xor tl.gather that compiles to one warp shuffle per register) costs N shuffles per tile instead
  of 5 per value for a reduction tree. `_BWD_BLOCK_E` 16 or 8 puts a channel's N states on 2 or 4 lanes instead
  (fewer registers; slower on Triton 3.6, BENCHMARKS.md).
- Determinism: no atomics. Sums over channels (dB, dC) are written per channel block and summed with torch; sums over
  batch and tokens (dA, dD, d delta_bias) are written per program and summed with torch.

Known limits
- N (state size) <= 32 (one butterfly level per lane bit); Vim uses N = 16.
- fp32 arithmetic throughout; exp / log are the hardware exp2 / lg2 (about 2 ulp), as in CUDA selective-scan kernels.
- Performance: bounded by latency of the per-token recurrence (one warp walks a whole chunk) and, in the backward,
  by registers (about 250 per thread, 8 warps per SM) - see BENCHMARKS.md "Selective scan kernel".
- Under TRITON_INTERPRET=1 it runs on CPU tensors (slowly): that is how the tests run without a GPU.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_scan_inputs

__all__ = ["bidirectional_scan_triton"]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------------
# elementwise helpers (fp32)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _log(x, FAST: tl.constexpr):
    if FAST:  # the hardware lg2 (tl.log is a ~25-instruction software log); not available to the interpreter
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
        return y * LN2
    else:
        return tl.log(x)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    # torch's softplus: x above 20, else log1p(exp(x)); log1p by Kahan's trick log(w) * e / (w - 1), exact when w == 1
    e = tl.exp2(tl.minimum(x, 20.0) * LOG2E)
    w = 1.0 + e
    den = tl.where(w == 1.0, 1.0, w - 1.0)
    lp = tl.where(w == 1.0, e, _log(w, FAST) * (e / den))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:  # not pure, so the compiler recomputes it instead of keeping SEG decay tiles alive in registers
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=False,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _cast(x, dtype: tl.constexpr, FAST: tl.constexpr):
    """fp32 -> output dtype, rounding to nearest even. Triton's interpreter truncates to bf16, so without FAST (i.e.
    under the interpreter) bf16 is rounded here by bit arithmetic; on the GPU the conversion instruction rounds."""
    if not FAST:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _prefetch(ptrs, mask, FAST: tl.constexpr):
    """Hint to bring the lines at ptrs (a tensor, or a scalar: e.g. a B or C row of N fp32, one line) into L1: no
    registers, no wait. The loops are bound by load latency, and a value loaded ahead into registers costs registers
    that the loops do not have. mask None: all addresses valid. The interpreter has no inline assembly, so there the
    addresses are loaded and discarded instead (the tests' bounds check sees them)."""
    if FAST:
        if mask is None:
            tl.inline_asm_elementwise("{ prefetch.global.L1 [$1]; mov.u32 $0, 0; }", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L1 [$1]; mov.u32 $0, 0; }", "=r,l,r",
                [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.load(ptrs, mask=mask)


@triton.jit
def _load_n(ptrs, mn, EVEN_N: tl.constexpr):
    """A token's [N] vector (B or C, fp32): unmasked when N == BLOCK_N, so no register zeroing for masked lanes."""
    if EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mn, other=0.0)


@triton.jit
def _sum_rows(x, LOG_R: tl.constexpr):
    """Sum of a [2**LOG_R, C] tile over its rows (registers) as a pairwise tree: LOG_R dependent adds, not R - 1."""
    for _ in tl.static_range(LOG_R):
        lo, hi = tl.split(tl.permute(tl.reshape(x, [2, x.shape[0] // 2, x.shape[1]]), (1, 2, 0)))
        x = lo + hi
    return tl.reshape(x, [x.shape[1]])


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _fwd_load(u_ptrs, d_ptrs, B_ptrs, C_ptrs, me, mn, EVEN_N: tl.constexpr):
    """One token's inputs of one direction (u, delta [BE] as fp32; B, C [BN])."""
    u = _load_f32(u_ptrs, me)
    x = _load_f32(d_ptrs, me)
    return u, x, _load_n(B_ptrs, mn, EVEN_N), _load_n(C_ptrs, mn, EVEN_N)


@triton.jit
def _fwd_step(h, A2, Dv, bias, u, x, Bt, Ct, LOG_N: tl.constexpr, FAST: tl.constexpr):
    """One token of one direction: h [BN, BE] fp32, returns (h, y [BE])."""
    return _fwd_step_dt(h, A2, Dv, _softplus(x + bias, FAST), u, Bt, Ct, LOG_N)


@triton.jit
def _fwd_step_dt(h, A2, Dv, dt, u, Bt, Ct, LOG_N: tl.constexpr):
    """`_fwd_step` with dt = softplus(delta + bias) already computed (a token ahead, off the recurrence's path)."""
    a = tl.exp2(dt[None, :] * A2)
    h = a * h + (dt * u)[None, :] * Bt[:, None]
    y = _sum_rows(h * Ct[:, None], LOG_N) + Dv * u
    return h, y


@triton.jit
def _load_f32(ptrs, mask):
    """One token's [BE] per-channel input (u, delta, z, dout, ysum) as fp32, masked lanes 0."""
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _prefetch_token(u_ptrs, d_ptrs, B_row, C_row, me, FAST: tl.constexpr):
    """Prefetch one token of one direction: u, delta ([BE] pointers) and the B, C rows (scalar addresses; C_row
    None: B only)."""
    _prefetch(u_ptrs, me, FAST)
    _prefetch(d_ptrs, me, FAST)
    _prefetch(B_row, None, FAST)
    if C_row is not None:
        _prefetch(C_row, None, FAST)


@triton.jit
def _directions(ptr, s_d):
    """Pointers into direction 0 and direction 1 of a (2, ...) tensor whose direction stride is s_d."""
    return ptr, ptr + s_d


@triton.jit
def _direction_params(A_ptr, bias_ptr, ne_off, e, E, N, m2, me):
    """Both directions' A (times log2 e, for exp2) as [N, E] tiles and dt biases as [E] vectors."""
    A0 = tl.load(A_ptr + ne_off, mask=m2, other=0.0) * LOG2E
    A1 = tl.load(A_ptr + N * E + ne_off, mask=m2, other=0.0) * LOG2E
    bias0 = tl.load(bias_ptr + e, mask=me, other=0.0)
    bias1 = tl.load(bias_ptr + E + e, mask=me, other=0.0)
    return A0, A1, bias0, bias1


@triton.jit
def _save_checkpoints(ck_ptr, run0, run1, ck_off, s, h0, h1, CK: tl.constexpr, TILE: tl.constexpr):
    """Both directions' states before scan position s, if s starts a CK block: tile s // CK of each direction's run
    of the backward's level-1 checkpoints (int64 offsets throughout, so the 16 addresses of a tile are one register
    pair plus immediates)."""
    if s % CK == 0:
        tile = ck_ptr + (s // CK) * TILE + ck_off
        tl.store(tile + run0, h0)
        tl.store(tile + run1, h1)


@triton.jit
def _fwd_prologue(u0, u1, d0, d1, ta, tb, t0, last, su_l, sd_l, bias0, bias1, me, FAST: tl.constexpr):
    """What the forward's loops carry into their first token (ta for direction 0, tb for direction 1): u, dt, and
    the next token's delta."""
    ua = _load_f32(u0 + ta * su_l, me)
    ub = _load_f32(u1 + tb * su_l, me)
    dta = _softplus(_load_f32(d0 + ta * sd_l, me) + bias0, FAST)
    dtb = _softplus(_load_f32(d1 + tb * sd_l, me) + bias1, FAST)
    xa = _load_f32(d0 + tl.minimum(ta + 1, last) * sd_l, me)
    xb = _load_f32(d1 + tl.maximum(tb - 1, t0) * sd_l, me)
    return ua, ub, dta, dtb, xa, xb


@triton.jit
def _fwd_loads(u0, u1, d0, d1, B0, B1, C0, C1, tf, tb, nf, nb, t0, last, su_l, sd_l, sB_l, sC_l, me, mn,
               EVEN_N: tl.constexpr):
    """A forward step's loads for tokens tf (direction 0) and tb (direction 1): u of the next tokens nf, nb, delta
    two ahead, B and C of the tokens themselves (past the chunk's ends: its last / first token, unused)."""
    una = _load_f32(u0 + nf * su_l, me)
    unb = _load_f32(u1 + nb * su_l, me)
    xna = _load_f32(d0 + tl.minimum(tf + 2, last) * sd_l, me)
    xnb = _load_f32(d1 + tl.maximum(tb - 2, t0) * sd_l, me)
    Ba, Ca = _load_n(B0 + tf * sB_l, mn, EVEN_N), _load_n(C0 + tf * sC_l, mn, EVEN_N)
    Bb, Cb = _load_n(B1 + tb * sB_l, mn, EVEN_N), _load_n(C1 + tb * sC_l, mn, EVEN_N)
    return una, unb, xna, xnb, Ba, Ca, Bb, Cb


# ----------------------------------------------------------------------------------------------------------------------
# forward, pass 1: per-chunk end state from a zero start (only for chunked sequences); both directions of a chunk in
# one program, as in the main pass (two independent recurrences: ILP, and half the programs)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["zero"])
def _fwd_chunk_state_kernel(
    # pointers
    u_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, hloc_ptr, P_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, PF: tl.constexpr, FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)
    last = t0 + T - 1

    ne_off = zero + n[:, None] * E + e[None, :]            # see _scan_fwd_kernel: [N, E] tiles, channels over lanes
    A0, A1, bias0, bias1 = _direction_params(A_ptr, bias_ptr, ne_off, e, E, N, m2, me)
    u0, u1 = _directions(u_ptr + b64 * su_b + e * su_e, su_d)
    d0, d1 = _directions(dl_ptr + b64 * sd_b + e * sd_e, sd_d)
    B0, B1 = _directions(B_ptr + b64 * sB_b + n * sB_n, sB_d)
    B0r, B1r = _directions(B_ptr + b64 * sB_b, sB_d)

    # direction 0 walks the chunk from its first token, direction 1 from its last; loads as in the main pass (u a
    # token ahead, delta two, dt one, B at use)
    h0 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    h1 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dtsum0 = tl.zeros([BLOCK_E], tl.float32)
    dtsum1 = tl.zeros([BLOCK_E], tl.float32)
    ua, ub, dta, dtb, xa, xb = _fwd_prologue(u0, u1, d0, d1, t0, last, t0, last, su_l, sd_l, bias0, bias1, me, FAST)
    for s in range(0, T):
        tf = t0 + s
        tb = last - s
        una = _load_f32(u0 + tl.minimum(tf + 1, last) * su_l, me)
        unb = _load_f32(u1 + tl.maximum(tb - 1, t0) * su_l, me)
        xna = _load_f32(d0 + tl.minimum(tf + 2, last) * sd_l, me)
        xnb = _load_f32(d1 + tl.maximum(tb - 2, t0) * sd_l, me)
        Ba = _load_n(B0 + tf * sB_l, mn, EVEN_N)
        Bb = _load_n(B1 + tb * sB_l, mn, EVEN_N)
        if PF > 0:
            pa = tl.minimum(tf + PF, last)
            pb = tl.maximum(tb - PF, t0)
            _prefetch_token(u0 + pa * su_l, d0 + pa * sd_l, B0r + pa * sB_l, None, me, FAST)
            _prefetch_token(u1 + pb * su_l, d1 + pb * sd_l, B1r + pb * sB_l, None, me, FAST)
        dtna = _softplus(xa + bias0, FAST)
        dtnb = _softplus(xb + bias1, FAST)
        dtsum0 += dta
        dtsum1 += dtb
        h0 = tl.exp2(dta[None, :] * A0) * h0 + (dta * ua)[None, :] * Ba[:, None]
        h1 = tl.exp2(dtb[None, :] * A1) * h1 + (dtb * ub)[None, :] * Bb[:, None]
        ua, dta, xa = una, dtna, xna
        ub, dtb, xb = unb, dtnb, xnb
    # the combine reads direction 0's end states of chunks 0..n-2 and direction 1's of chunks 1..n-1
    off0 = (b64 * nchunks + c) * N * E + ne_off
    off1 = ((batch + b64) * nchunks + c) * N * E + ne_off
    tl.store(hloc_ptr + off0, h0, mask=m2 & (c < nchunks - 1))
    tl.store(P_ptr + off0, tl.exp2(dtsum0[None, :] * A0), mask=m2 & (c < nchunks - 1))
    tl.store(hloc_ptr + off1, h1, mask=m2 & (c > 0))
    tl.store(P_ptr + off1, tl.exp2(dtsum1[None, :] * A1), mask=m2 & (c > 0))


# ----------------------------------------------------------------------------------------------------------------------
# pass 2 (forward states and backward adjoints): X_in[first] = 0, X_in[next] = P[prev] * X_in[prev] + S[prev]
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_combine_kernel(
    # pointers
    S_ptr, P_ptr, X_ptr,
    # dimensions
    batch, NE, nchunks,
    # meta-parameters
    REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    d = tl.program_id(2)
    f = pid * BLOCK + tl.arange(0, BLOCK)
    m = f < NE
    base = (d.to(tl.int64) * batch + b) * nchunks * NE + f
    # processing order: ascending chunks for direction 0 (forward states), reversed for direction 1; REVERSE flips both
    asc = (d == 0) != REVERSE
    c = tl.where(asc, 0, nchunks - 1)
    step = tl.where(asc, 1, -1)
    X = tl.zeros([BLOCK], tl.float32)
    tl.store(X_ptr + base + c * NE, X, mask=m)
    for _ in range(1, nchunks):
        X = tl.load(P_ptr + base + c * NE, mask=m, other=0.0) * X + tl.load(S_ptr + base + c * NE, mask=m, other=0.0)
        c += step
        tl.store(X_ptr + base + c * NE, X, mask=m)


# ----------------------------------------------------------------------------------------------------------------------
# forward, main pass: both directions in one program, gate and average fused
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["zero"])
def _scan_fwd_kernel(
    # pointers
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, hin_ptr, part_ptr, out_ptr, ysum_ptr, ck_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks, nblk,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    sC_d, sC_b, sC_n, sC_l,
    sz_b, sz_e, sz_l,
    so_b, so_e, so_l,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr, HAS_CARRY: tl.constexpr,
    SAVE_YSUM: tl.constexpr, SAVE_CK: tl.constexpr, CK: tl.constexpr, EVEN_N: tl.constexpr, PF: tl.constexpr,
    FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)

    # Every [N, E] tile in memory (A, carried states) is addressed channels-contiguous plus `zero`, a runtime 0 the
    # compiler cannot see: Triton's coalescing then orders channels first with one element per lane, i.e. the
    # register layout this kernel is written for (channels over the 32 lanes, all N of a channel in one lane, so the
    # N reductions stay inside a thread), whatever the Triton version's tie-breaking.
    ne_off = zero + n[:, None] * E + e[None, :]
    A0, A1, bias0, bias1 = _direction_params(A_ptr, bias_ptr, ne_off, e, E, N, m2, me)
    D0 = tl.load(D_ptr + e, mask=me, other=0.0)
    D1 = tl.load(D_ptr + E + e, mask=me, other=0.0)
    if HAS_CARRY:
        h0 = tl.load(hin_ptr + (b64 * nchunks + c) * N * E + ne_off, mask=m2, other=0.0)
        h1 = tl.load(hin_ptr + ((batch + b64) * nchunks + c) * N * E + ne_off, mask=m2, other=0.0)
    else:
        h0 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        h1 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)

    u0, u1 = _directions(u_ptr + b64 * su_b + e * su_e, su_d)
    d0, d1 = _directions(dl_ptr + b64 * sd_b + e * sd_e, sd_d)
    B0, B1 = _directions(B_ptr + b64 * sB_b + n * sB_n, sB_d)
    C0, C1 = _directions(C_ptr + b64 * sC_b + n * sC_n, sC_d)
    zr = z_ptr + b64 * sz_b + e * sz_e
    # B, C row addresses (scalars), for the prefetches
    B0r, B1r = _directions(B_ptr + b64 * sB_b, sB_d)
    C0r, C1r = _directions(C_ptr + b64 * sC_b, sC_d)
    o_off = b64 * so_b + e * so_e
    pr = part_ptr + o_off
    orow = out_ptr + o_off
    yrow = ysum_ptr + o_off
    # SAVE_CK: the backward's level-1 checkpoints (the state before every CK-th position of each direction, laid out
    # as the backward's scratch: one run of nblk [N, BLOCK_E] tiles per (direction, batch, chunk, channel block))
    TILE: tl.constexpr = BLOCK_E * BLOCK_N
    ck_off = zero.to(tl.int64) + n[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    ck_run0 = ((b64 * nchunks + c) * tl.num_programs(0) + pid_e) * nblk * TILE
    ck_run1 = (((batch + b64) * nchunks + c) * tl.num_programs(0) + pid_e) * nblk * TILE

    # The recurrences are latency-bound (one warp walks all tokens), so work is issued ahead of its use: the inputs
    # PF tokens ahead are prefetched into L1, u is loaded one token ahead and delta two, and dt = softplus(delta +
    # bias) (a chain of ~20 dependent instructions) is computed one token ahead, so that it overlaps the current
    # token's exps instead of preceding them. B and C (2 x 16 registers a direction) are loaded at use: a token
    # ahead they do not fit the register cap (ptxas then sinks those loads to the end of the loop, where the
    # rotation of the loop-carried registers waits for them).
    last = t0 + T - 1
    half = T // 2
    # first half: each direction parks its y where the other direction will arrive later
    ua, ub, dta, dtb, xa, xb = _fwd_prologue(u0, u1, d0, d1, t0, last, t0, last, su_l, sd_l, bias0, bias1, me, FAST)
    for s in range(0, half):
        tf = t0 + s
        tb = last - s
        if SAVE_CK:
            _save_checkpoints(ck_ptr, ck_run0, ck_run1, ck_off, s, h0, h1, CK, TILE)
        una, unb, xna, xnb, Ba, Ca, Bb, Cb = _fwd_loads(u0, u1, d0, d1, B0, B1, C0, C1, tf, tb, tf + 1, tb - 1, t0,
                                                        last, su_l, sd_l, sB_l, sC_l, me, mn, EVEN_N)
        if PF > 0:
            pa = tl.minimum(tf + PF, last)
            pb = tl.maximum(tb - PF, t0)
            _prefetch_token(u0 + pa * su_l, d0 + pa * sd_l, B0r + pa * sB_l, C0r + pa * sC_l, me, FAST)
            _prefetch_token(u1 + pb * su_l, d1 + pb * sd_l, B1r + pb * sB_l, C1r + pb * sC_l, me, FAST)
        dtna = _softplus(xa + bias0, FAST)
        dtnb = _softplus(xb + bias1, FAST)
        h0, y0 = _fwd_step_dt(h0, A0, D0, dta, ua, Ba, Ca, LOG_N)
        h1, y1 = _fwd_step_dt(h1, A1, D1, dtb, ub, Bb, Cb, LOG_N)
        tl.store(pr + tf * so_l, y0, mask=me)
        tl.store(pr + tb * so_l, y1, mask=me)
        ua, dta, xa = una, dtna, xna
        ub, dtb, xb = unb, dtnb, xnb
    # second half: meet the parked value, gate, average, write (the middle token of an odd chunk meets in registers).
    # Its first token's inputs are loaded again rather than carried over from the first loop (carried values have
    # given Triton 3.6 a second layout and shared-memory conversions at every token).
    ua, ub, dta, dtb, xa, xb = _fwd_prologue(u0, u1, d0, d1, t0 + half, last - half, t0, last, su_l, sd_l, bias0,
                                             bias1, me, FAST)
    for s in range(half, T):
        tf = t0 + s
        tb = last - s
        if SAVE_CK:
            _save_checkpoints(ck_ptr, ck_run0, ck_run1, ck_off, s, h0, h1, CK, TILE)
        nf = tl.minimum(tf + 1, last)
        nb = tl.maximum(tb - 1, t0)
        una, unb, xna, xnb, Ba, Ca, Bb, Cb = _fwd_loads(u0, u1, d0, d1, B0, B1, C0, C1, tf, tb, nf, nb, t0, last,
                                                        su_l, sd_l, sB_l, sC_l, me, mn, EVEN_N)
        if PF > 0:                                   # here also z and the parked y (written in the first half)
            pa = tl.minimum(tf + PF, last)
            pb = tl.maximum(tb - PF, t0)
            _prefetch_token(u0 + pa * su_l, d0 + pa * sd_l, B0r + pa * sB_l, C0r + pa * sC_l, me, FAST)
            _prefetch_token(u1 + pb * su_l, d1 + pb * sd_l, B1r + pb * sB_l, C1r + pb * sC_l, me, FAST)
            _prefetch(zr + pa * sz_l, me, FAST)
            _prefetch(zr + pb * sz_l, me, FAST)
            _prefetch(pr + pa * so_l, me, FAST)
            _prefetch(pr + pb * so_l, me, FAST)
        dtna = _softplus(xa + bias0, FAST)
        dtnb = _softplus(xb + bias1, FAST)
        mid = tf == tb
        mo = me & (tf != tb)
        p0 = tl.load(pr + tf * so_l, mask=mo, other=0.0)
        p1 = tl.load(pr + tb * so_l, mask=mo, other=0.0)
        zf = _load_f32(zr + tf * sz_l, me)
        zb = _load_f32(zr + tb * sz_l, mo)
        h0, y0 = _fwd_step_dt(h0, A0, D0, dta, ua, Ba, Ca, LOG_N)
        h1, y1 = _fwd_step_dt(h1, A1, D1, dtb, ub, Bb, Cb, LOG_N)
        s0 = y0 + tl.where(mid, y1, p0)
        s1 = y1 + p1
        tl.store(orow + tf * so_l, _cast(zf * _sigmoid(zf) * s0 * 0.5, out_ptr.dtype.element_ty, FAST), mask=me)
        tl.store(orow + tb * so_l, _cast(zb * _sigmoid(zb) * s1 * 0.5, out_ptr.dtype.element_ty, FAST), mask=mo)
        if SAVE_YSUM:
            tl.store(yrow + tf * so_l, _cast(s0, ysum_ptr.dtype.element_ty, FAST), mask=me)
            tl.store(yrow + tb * so_l, _cast(s1, ysum_ptr.dtype.element_ty, FAST), mask=mo)
        ua, dta, xa = una, dtna, xna
        ub, dtb, xb = unb, dtnb, xnb


# ----------------------------------------------------------------------------------------------------------------------
# backward, pass 1: per-chunk adjoint carry from a zero end (only for chunked sequences), both directions of a chunk
# in one program. M_t = exp(dt_t A) v_t with v_t = C_t dy_t + M_{t+1} (t in scan order); a chunk maps
# M_in -> R + P * M_in.
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _adjoint_loads(d0, d1, z_p, g_p, ta, tb, sd_l, sz_l, sg_l, me):
    """The adjoint sweep's per-channel inputs: delta of direction 0 at token ta and of direction 1 at tb, and z and
    dout (shared by the directions) at both tokens."""
    return (_load_f32(d0 + ta * sd_l, me), _load_f32(d1 + tb * sd_l, me), _load_f32(z_p + ta * sz_l, me),
            _load_f32(z_p + tb * sz_l, me), _load_f32(g_p + ta * sg_l, me), _load_f32(g_p + tb * sg_l, me))


@triton.jit(do_not_specialize=["zero"])
def _bwd_chunk_state_kernel(
    # pointers
    dl_ptr, A_ptr, C_ptr, bias_ptr, z_ptr, dout_ptr, R_ptr, P_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks,
    # strides
    sd_d, sd_b, sd_e, sd_l,
    sC_d, sC_b, sC_n, sC_l,
    sz_b, sz_e, sz_l,
    sg_b, sg_e, sg_l,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, PF: tl.constexpr, FAST: tl.constexpr,
):
    pid_e = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    me = e < E
    mn = n < N
    m2 = mn[:, None] & me[None, :]
    b64 = b.to(tl.int64)
    t0 = c * chunk
    T = tl.minimum(L - t0, chunk)
    last = t0 + T - 1

    ne_off = zero + n[:, None] * E + e[None, :]            # see _scan_fwd_kernel: [N, E] tiles, channels over lanes
    A0, A1, bias0, bias1 = _direction_params(A_ptr, bias_ptr, ne_off, e, E, N, m2, me)
    d0, d1 = _directions(dl_ptr + b64 * sd_b + e * sd_e, sd_d)
    C0, C1 = _directions(C_ptr + b64 * sC_b + n * sC_n, sC_d)
    C0r, C1r = _directions(C_ptr + b64 * sC_b, sC_d)
    z_p = z_ptr + b64 * sz_b + e * sz_e
    g_p = dout_ptr + b64 * sg_b + e * sg_e

    # reverse scan order: direction 0 walks its chunk from the last token (ta), direction 1 from the first (tb);
    # the gate's dy = dout silu(z) / 2 is shared by the directions but read at different tokens
    M0 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    M1 = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dtsum0 = tl.zeros([BLOCK_E], tl.float32)
    dtsum1 = tl.zeros([BLOCK_E], tl.float32)
    xa, xb, za, zb, ga, gb = _adjoint_loads(d0, d1, z_p, g_p, last, t0, sd_l, sz_l, sg_l, me)
    for s in range(0, T):
        ta = last - s
        tb = t0 + s
        na = tl.maximum(ta - 1, t0)                   # next token's per-channel loads first (latency-bound loop)
        nb = tl.minimum(tb + 1, last)
        xna, xnb, zna, znb, gna, gnb = _adjoint_loads(d0, d1, z_p, g_p, na, nb, sd_l, sz_l, sg_l, me)
        Ca = _load_n(C0 + ta * sC_l, mn, EVEN_N)
        Cb = _load_n(C1 + tb * sC_l, mn, EVEN_N)
        if PF > 0:
            pa = tl.maximum(ta - PF, t0)
            pb = tl.minimum(tb + PF, last)
            _prefetch(d0 + pa * sd_l, me, FAST)
            _prefetch(d1 + pb * sd_l, me, FAST)
            _prefetch(z_p + pa * sz_l, me, FAST)
            _prefetch(z_p + pb * sz_l, me, FAST)
            _prefetch(g_p + pa * sg_l, me, FAST)
            _prefetch(g_p + pb * sg_l, me, FAST)
            _prefetch(C0r + pa * sC_l, None, FAST)
            _prefetch(C1r + pb * sC_l, None, FAST)
        dta = _softplus(xa + bias0, FAST)
        dtb = _softplus(xb + bias1, FAST)
        dtsum0 += dta
        dtsum1 += dtb
        dya = ga * za * _sigmoid(za) * 0.5
        dyb = gb * zb * _sigmoid(zb) * 0.5
        M0 = tl.exp2(dta[None, :] * A0) * (Ca[:, None] * dya[None, :] + M0)
        M1 = tl.exp2(dtb[None, :] * A1) * (Cb[:, None] * dyb[None, :] + M1)
        xa, za, ga = xna, zna, gna
        xb, zb, gb = xnb, znb, gnb
    # the combine reads direction 0's carries of chunks 1..n-1 and direction 1's of chunks 0..n-2
    off0 = (b64 * nchunks + c) * N * E + ne_off
    off1 = ((batch + b64) * nchunks + c) * N * E + ne_off
    tl.store(R_ptr + off0, M0, mask=m2 & (c > 0))
    tl.store(P_ptr + off0, tl.exp2(dtsum0[None, :] * A0), mask=m2 & (c > 0))
    tl.store(R_ptr + off1, M1, mask=m2 & (c < nchunks - 1))
    tl.store(P_ptr + off1, tl.exp2(dtsum1[None, :] * A1), mask=m2 & (c < nchunks - 1))


# ----------------------------------------------------------------------------------------------------------------------
# backward, main pass (one direction per program, one warp, channels across the 32 lanes, all N in each lane)
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _xor_cols(x, col, MASK: tl.constexpr):
    """x[:, c] <- x[:, c ^ MASK] (a gather along the columns: one warp shuffle per register when columns are lanes)."""
    return tl.gather(x, tl.broadcast_to((col ^ MASK)[None, :], x.shape), 1)


@triton.jit
def _col_sum(x, col, SCATTER: tl.constexpr, LOG_C: tl.constexpr):
    """Sums of an [R, 2**LOG_C] tile over its columns as a butterfly reduce-scatter: each of the first SCATTER levels
    halves the rows a column holds (a column keeps one half and adds its partner column's copy of that half), the
    other levels are plain pairwise sums. Returns an [R >> SCATTER, 2**LOG_C] tile; `_col_sum_rows` tells which row
    of x each element sums. The splits are free only over row bits held in registers (`_scatter_levels`)."""
    r = x
    for i in tl.static_range(SCATTER):
        lo, hi = tl.split(tl.permute(tl.reshape(r, [2, r.shape[0] // 2, r.shape[1]]), (1, 2, 0)))
        upi = (col & ((1 << (LOG_C - 1)) >> i)) != 0
        r = tl.where(upi[None, :], hi, lo) + _xor_cols(tl.where(upi[None, :], lo, hi), col, (1 << (LOG_C - 1)) >> i)
    for i in tl.static_range(SCATTER, LOG_C):
        r = r + _xor_cols(r, col, (1 << (LOG_C - 1)) >> i)
    return r


@triton.jit
def _col_sum_rows(n, col, SCATTER: tl.constexpr, LOG_C: tl.constexpr):
    """Row numbers of `_col_sum`'s result (the butterfly applied to the row numbers, column 0 only)."""
    return _col_sum(tl.where(col[None, :] == 0, n[:, None], 0).to(tl.float32), col, SCATTER, LOG_C).to(tl.int32)


@triton.jit
def _sweep(h, A2, bias, p_start, p_end, T, tbase, tstep, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn, ck, ck_off,
           z_p, g_p, sz_l, sg_l, dC_p, mC, col, NN, Br, Cr, y_p, sC_l, sy_l, d,
           EVERY: tl.constexpr, TILE: tl.constexpr, EVEN_N: tl.constexpr, FAST: tl.constexpr, WITH_DC: tl.constexpr,
           SCATTER: tl.constexpr, LOG_C: tl.constexpr, PF: tl.constexpr):
    """Forward recurrence over scan positions [p_start, p_end), storing the state before every EVERY-th position
    (counted from p_start) to ck.
    WITH_DC: also dC_t = sum over channels of h_t * dy_t (this block's partial, reduce-scattered over the columns).
    PF > 0: prefetches into L1 what this sweep reads PF positions ahead and, in the re-sweep (WITH_DC), C and ysum
    of the position, which the walk back over the block reads next. (Prefetching the next block during this one
    was slower, into L1 or L2: in L1 it evicts the block being walked.)"""
    t = tbase + p_start * tstep
    u = _load_f32(u_p + t * su_l, me)
    Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
    dt = _softplus(_load_f32(d_p + t * sd_l, me) + bias, FAST)
    x = _load_f32(d_p + (tbase + tl.minimum(p_start + 1, T - 1) * tstep) * sd_l, me)
    if WITH_DC:
        zz = _load_f32(z_p + t * sz_l, me)
        g = _load_f32(g_p + t * sg_l, me)
    for p in range(p_start, p_end):
        if (p - p_start) % EVERY == 0:
            tl.store(ck + ((p - p_start) // EVERY) * TILE + ck_off, h)
        # u, B, z, dout a position ahead, delta two, dt = softplus(delta + bias) one (off the recurrence's path)
        tn = tbase + tl.minimum(p + 1, T - 1) * tstep
        un = _load_f32(u_p + tn * su_l, me)
        Bn = _load_n(B_p + tn * sB_l, mn, EVEN_N)
        xn = _load_f32(d_p + (tbase + tl.minimum(p + 2, T - 1) * tstep) * sd_l, me)
        if WITH_DC:
            zn = _load_f32(z_p + tn * sz_l, me)
            gn = _load_f32(g_p + tn * sg_l, me)
        if PF > 0:
            tp = tbase + tl.minimum(p + PF, T - 1) * tstep
            _prefetch(u_p + tp * su_l, me, FAST)
            _prefetch(d_p + tp * sd_l, me, FAST)
            _prefetch(Br + tp * sB_l, None, FAST)
            if WITH_DC:  # also z, dout ahead, and what the walk back over this block reads besides (C, ysum)
                _prefetch(z_p + tp * sz_l, me, FAST)
                _prefetch(g_p + tp * sg_l, me, FAST)
                t = tbase + p * tstep
                _prefetch(Cr + t * sC_l, None, FAST)
                if d == 0:
                    _prefetch(y_p + t * sy_l, me, FAST)
        dtn = _softplus(x + bias, FAST)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * Bt[:, None]
        if WITH_DC:
            dy = g * zz * _sigmoid(zz) * 0.5
            tl.store(dC_p + (tbase + p * tstep) * NN, _col_sum(h * dy[None, :], col, SCATTER, LOG_C), mask=mC)
            zz, g = zn, gn
        u, Bt, dt, x = un, Bn, dtn, xn
    return h


@triton.jit(do_not_specialize=["zero"])
def _scan_bwd_kernel(
    # pointers: inputs
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, dout_ptr, ysum_ptr, hin_ptr, min_ptr, ck_ptr, ck2_ptr,
    # pointers: outputs
    du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    # dimensions
    batch, E, L, N, chunk, nchunks, nblk,
    # strides
    su_d, su_b, su_e, su_l,
    sd_d, sd_b, sd_e, sd_l,
    sB_d, sB_b, sB_n, sB_l,
    sC_d, sC_b, sC_n, sC_l,
    sz_b, sz_e, sz_l,
    sg_b, sg_e, sg_l,
    sy_b, sy_e, sy_l,
    sgu_d, sgu_b, sgu_e, sgu_l,
    sgd_d, sgd_b, sgd_e, sgd_l,
    sgz_b, sgz_e, sgz_l,
    zero,
    # meta-parameters
    BLOCK_E: tl.constexpr, LOG_C: tl.constexpr, BLOCK_N: tl.constexpr, SCATTER: tl.constexpr, CK: tl.constexpr,
    SEG: tl.constexpr, HAS_CARRY: tl.constexpr, SAVED_CK: tl.constexpr, EVEN_N: tl.constexpr, PF: tl.constexpr,
    FAST: tl.constexpr,
):
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
    tbase = t0 + d * (T - 1)                # token of scan position p is tbase + p * tstep
    tstep = 1 - 2 * d

    # [N, E] tiles in memory (A, carried states, checkpoints, dA) are addressed channels-contiguous plus `zero`, as
    # in _scan_fwd_kernel, so every tile keeps the channels-over-lanes layout (the reduce-scatter relies on it).
    ne_off = zero + n[:, None] * E + e[None, :]
    A2 = tl.load(A_ptr + d64 * E * N + ne_off, mask=m2, other=0.0) * LOG2E
    ck_off = zero + n[:, None] * BLOCK_E + col[None, :]
    Dv = tl.load(D_ptr + d * E + e, mask=me, other=0.0)
    bias = tl.load(bias_ptr + d * E + e, mask=me, other=0.0)
    cbase = ((d64 * batch + b) * nchunks + c) * N * E
    if HAS_CARRY:
        M = tl.load(min_ptr + cbase + ne_off, mask=m2, other=0.0)
    else:
        M = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)

    u_p = u_ptr + d64 * su_d + b64 * su_b + e * su_e
    d_p = dl_ptr + d64 * sd_d + b64 * sd_b + e * sd_e
    B_p = B_ptr + d64 * sB_d + b64 * sB_b + n * sB_n
    C_p = C_ptr + d64 * sC_d + b64 * sC_b + n * sC_n
    z_p = z_ptr + b64 * sz_b + e * sz_e
    g_p = dout_ptr + b64 * sg_b + e * sg_e
    y_p = ysum_ptr + b64 * sy_b + e * sy_e
    gu_p = du_ptr + d64 * sgu_d + b64 * sgu_b + e * sgu_e
    gd_p = ddl_ptr + d64 * sgd_d + b64 * sgd_b + e * sgd_e
    gz_p = dz_ptr + b64 * sgz_b + e * sgz_e
    Br = B_ptr + d64 * sB_d + b64 * sB_b             # B, C row addresses (scalars), for the prefetches
    Cr = C_ptr + d64 * sC_d + b64 * sC_b
    # private scratch of this program: level-1 checkpoints (one per CK tokens) and level-2 (one per SEG tokens of the
    # CK block being processed, rewritten for every block, so it stays in L1/L2)
    prog = ((d64 * batch + b) * nchunks + c) * n_eb + pid_e
    ck = ck_ptr + prog * nblk * TILE
    ck2 = ck2_ptr + prog * NSUB * TILE

    # dB / dC partial sums of this channel block go to (n_eb, 2, batch, L, N): a reduce-scatter over the columns
    # leaves each row's sum in 2**(LOG_C - SCATTER) columns, of which the first stores it (rows >= N are padding)
    nres = _col_sum_rows(n, col, SCATTER, LOG_C)
    part_off = ((pid_e.to(tl.int64) * 2 + d) * batch + b) * L * N + nres
    dB_p = dB_ptr + part_off
    dC_p = dC_ptr + part_off
    mBC = (nres < N) & ((col & ((1 << (LOG_C - SCATTER)) - 1)) == 0)[None, :]

    # phase 1: forward recurrence from the chunk's start state, a checkpoint before every CK tokens (next token's
    # loads issued before this token's arithmetic, as in the forward kernel)
    if not SAVED_CK:  # (else the forward kept them)
        if HAS_CARRY:
            h = tl.load(hin_ptr + cbase + ne_off, mask=m2, other=0.0)
        else:
            h = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
        _sweep(h, A2, bias, 0, T, T, tbase, tstep, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn, ck, ck_off,
               z_p, g_p, sz_l, sg_l, dC_p, mBC, col, N, Br, Cr, y_p, sC_l, sy_l, d,
               CK, TILE, EVEN_N, FAST, False, SCATTER, LOG_C, PF)

    # phase 2: CK blocks from the last; each is re-swept into level-2 checkpoints (producing dC on the way), then its
    # SEG-token sub-blocks are recomputed into registers (the stash) and walked backwards (producing the rest)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    dD_acc = tl.zeros([BLOCK_E], tl.float32)
    db_acc = tl.zeros([BLOCK_E], tl.float32)
    nblk_here = tl.cdiv(T, CK)  # a short last chunk has fewer blocks than the scratch is sized for
    for jbr in range(0, nblk_here):
        jb = nblk_here - 1 - jbr
        pb = jb * CK
        h = tl.load(ck + jb * TILE + ck_off)
        if PF > 0:  # the next block's level-1 checkpoint (written in phase 1, long out of L1)
            _prefetch(ck + tl.maximum(jb - 1, 0) * TILE + ck_off, None, FAST)
        h = _sweep(h, A2, bias, pb, tl.minimum(pb + CK, T), T, tbase, tstep, u_p, d_p, B_p, su_l, sd_l, sB_l, me, mn,
                   ck2, ck_off, z_p, g_p, sz_l, sg_l, dC_p, mBC, col, N, Br, Cr, y_p, sC_l, sy_l, d,
                   SEG, TILE, EVEN_N, FAST, True, SCATTER, LOG_C, PF)
        nsub = tl.cdiv(tl.minimum(CK, T - pb), SEG)
        for jsr in range(0, nsub):
            js = nsub - 1 - jsr
            p0 = pb + js * SEG
            h = tl.load(ck2 + js * TILE + ck_off)
            if PF > 0:  # the next segment's level-2 checkpoint (stores do not leave it in L1)
                _prefetch(ck2 + tl.maximum(js - 1, 0) * TILE + ck_off, None, FAST)
            ahs = ()
            dts = ()
            us = ()
            for k in tl.static_range(SEG):
                valid = p0 + k < T
                mt = me & valid
                # past the chunk end: read a valid token (no masks on the [N] loads) but use dt = 0, u = 0, so
                # exp(dt A) = 1 and there is no input
                t = tbase + tl.where(valid, p0 + k, 0) * tstep
                u = tl.load(u_p + t * su_l, mask=mt, other=0.0).to(tl.float32)
                x = tl.load(d_p + t * sd_l, mask=mt, other=0.0).to(tl.float32) + bias
                Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
                dt = tl.where(mt, _softplus(x, FAST), 0.0)
                ah = _exp2(dt[None, :] * A2, FAST) * h
                h = ah + (dt * u)[None, :] * Bt[:, None]
                ahs = ahs + (ah,)
                dts = dts + (dt,)
                us = us + (u,)
            for k in tl.static_range(SEG - 1, -1, -1):
                valid = p0 + k < T
                mt = me & valid
                t = tbase + tl.where(valid, p0 + k, 0) * tstep
                ah = ahs[k]
                dt = dts[k]
                u = us[k]
                Bt = _load_n(B_p + t * sB_l, mn, EVEN_N)
                Ct = _load_n(C_p + t * sC_l, mn, EVEN_N)
                zz = tl.load(z_p + t * sz_l, mask=mt, other=0.0).to(tl.float32)
                g = tl.load(g_p + t * sg_l, mask=mt, other=0.0).to(tl.float32)
                sz = _sigmoid(zz)
                dy = g * zz * sz * 0.5
                dtu = dt * u
                v = Ct[:, None] * dy[None, :] + M                       # dL/dh_t
                q = v * ah                                               # v_t * exp(dt_t A) * h_{t-1}
                vB, qA = tl.reduce((v * Bt[:, None], q * A2), 0, _add2)
                # d softplus / dx = sigmoid(x) = 1 - exp(-dt)
                ddl = tl.where(mt, (qA * LN2 + u * vB) * (1.0 - tl.exp2(-dt * LOG2E)), 0.0)
                dA_acc += q * dt[None, :]
                dD_acc += dy * u
                db_acc += ddl
                tl.store(gu_p + t * sgu_l, _cast(dt * vB + Dv * dy, du_ptr.dtype.element_ty, FAST), mask=mt)
                tl.store(gd_p + t * sgd_l, _cast(ddl, ddl_ptr.dtype.element_ty, FAST), mask=mt)
                if d == 0:
                    ys = tl.load(y_p + t * sy_l, mask=mt, other=0.0).to(tl.float32)
                    dz = g * ys * 0.5 * sz * (1.0 + zz * (1.0 - sz))
                    tl.store(gz_p + t * sgz_l, _cast(dz, dz_ptr.dtype.element_ty, FAST), mask=mt)
                tl.store(dB_p + t * N, _col_sum(v * dtu[None, :], col, SCATTER, LOG_C), mask=mBC & valid)
                M = _exp2(dt[None, :] * A2, FAST) * v
    # per-program partial sums over this chunk's tokens: (batch * nchunks, 2, N, E) and (batch * nchunks, 2, E)
    row = (b64 * nchunks + c) * 2 + d
    tl.store(dA_ptr + row * E * N + ne_off, dA_acc, mask=m2)
    tl.store(dD_ptr + row * E + e, dD_acc, mask=me)
    tl.store(dbias_ptr + row * E + e, db_acc, mask=me)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
_FWD_WARPS = 1           # forward: warps of 32 channels per program
_TARGET_PROGRAMS = None  # forward programs wanted before chunking stops (None: _WAVES full waves on this GPU)
_WAVES = 1
_MIN_CHUNK = 256         # shorter sequences are never cut: a cut costs an extra sweep over the chunk
_FWD_MAXNREG = 168       # register cap of the forward kernel: 12 one-warp programs per SM (all of Vim-T 224 at once)
_BWD_MAXNREG = None      # register cap of the backward kernel (None: the compiler's choice)
_BWD_WARPS = 1           # backward: warps per program (> 1 splits the N states over warps: fewer registers a thread)
_BWD_BLOCK_E = 32        # backward: channels per program (16, 8: a channel's N states split over 2, 4 lanes)
_CK = 16                 # backward: tokens per level-1 checkpoint
_SEG = 2                 # backward: tokens per level-2 checkpoint (the register stash holds SEG states)
_PF = 4                  # tokens ahead that the sequential loops prefetch into L1 (0: no prefetch)


def _scatter_levels(block_n, block_e, warps):
    """Reduce-scatter levels of `_col_sum` on a [block_n, block_e] tile whose columns are lanes: one per row bit held
    in registers. The lanes beyond block_e (32 / block_e of them per column) and the warps hold row bits too, and a
    level over one of those would move data between layouts."""
    log_n, log_c = block_n.bit_length() - 1, block_e.bit_length() - 1
    row_bits_outside = max(5 - log_c, 0) + (warps.bit_length() - 1)
    return min(max(log_n - row_bits_outside, 0), log_c)


def _launch_opts(t, maxnreg):
    """Register cap (ptxas maxrregcount) on the GPU; the interpreter takes no such option."""
    return {"maxnreg": maxnreg} if (t.is_cuda and maxnreg) else {}


def _wave(device):
    """One-warp forward programs resident at once: SMs x warps per SM that the register cap allows."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return sms * (65536 // (32 * (_FWD_MAXNREG or 255)))


def _num_chunks(batch, E, L, chunk_size, device):
    """Chunks per sequence. Sequences are cut only as far as needed to give every resident warp a program, since
    each chunk boundary costs an extra pass over the chunk (its end state) in both forward and backward."""
    if chunk_size is not None:
        return triton.cdiv(L, max(int(chunk_size), 1))
    programs = batch * triton.cdiv(E, 32 * _FWD_WARPS)
    target = _TARGET_PROGRAMS or _WAVES * _wave(device)
    return max(1, min(target // programs, L // _MIN_CHUNK))


def _token_major(t):
    """True when the channel dimension (-2) is the contiguous one, i.e. the tensor is a token-major view."""
    return t.stride(-2) == 1 and t.stride(-1) != 1


def _empty_like_layout(ref, shape, dtype):
    """(.., E, L) buffer laid out like `ref`: token-major when ref is, else contiguous."""
    if _token_major(ref):
        return torch.empty(shape[:-2] + (shape[-1], shape[-2]), dtype=dtype, device=ref.device).transpose(-1, -2)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def _bc_token_major(t):
    """B, C as fp32 (2, batch, N, L) views with N contiguous: a token's N values are one vector load and need no
    conversion in every lane (a small copy: B and C are 1/E of u's size)."""
    if t.dtype == torch.float32 and t.stride(-2) == 1:
        return t
    return t.transpose(-1, -2).float().contiguous().transpose(-1, -2)


def _prep(u, delta, A, B, C, D, z, delta_bias):
    K, batch, E, L, N = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    if K != 2:
        raise ValueError(f"bidirectional scan needs 2 directions, got {K}")
    if N > 32:
        raise ValueError(f"the Triton scan supports a state size N <= 32, got {N}")
    A = A.float().transpose(1, 2).contiguous()  # (2, N, E): the kernels' [N, E] tiles are channels-contiguous
    D = D.float().contiguous()
    delta_bias = delta_bias.float().contiguous()
    return batch, E, L, N, A, D, delta_bias, _bc_token_major(B), _bc_token_major(C)


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def _chunking(batch, E, L, chunk_size, device):
    """(tokens per chunk, chunks per sequence); the backward cuts the sequence where the forward did."""
    chunk = triton.cdiv(L, _num_chunks(batch, E, L, chunk_size, device))
    return chunk, triton.cdiv(L, chunk)


def _saves_checkpoints(save, save_states):
    """Whether a forward keeps the backward's level-1 checkpoints (its programs must cover the backward's channels)."""
    return save and save_states and 32 * _FWD_WARPS == _BWD_BLOCK_E


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk_size=None, save=False, save_states=False, launch=True):
    """Returns out (batch, E, L) in u's dtype; when `save`, also ysum (y_fwd + y_bwd, u's dtype) and the states the
    backward starts from: the chunk start states (2, batch, nchunks, N, E) fp32, or with save_states every level-1
    checkpoint (the backward's scratch layout), each empty where unused (not saved, or a single chunk).
    launch=False allocates the outputs and runs nothing: the custom op's fake, with the real strides by construction."""
    batch, E, L, N, A, D, delta_bias, B, C = _prep(u, delta, A, B, C, D, z, delta_bias)
    dev = u.device
    chunk, nchunks = _chunking(batch, E, L, chunk_size, dev)
    BLOCK_E = 32 * _FWD_WARPS
    BLOCK_N = triton.next_power_of_2(N)
    n_eb = triton.cdiv(E, BLOCK_E)
    nblk = triton.cdiv(chunk, _CK)
    save_ck = _saves_checkpoints(save, save_states)
    out = _empty_like_layout(u, (batch, E, L), u.dtype)
    ysum = _empty_like_layout(u, (batch, E, L), u.dtype) if save else u.new_empty(0)
    hin = torch.empty((2, batch, nchunks, N, E), dtype=torch.float32, device=dev) if nchunks > 1 else u.new_empty(0)
    ck = (torch.empty((2 * batch * nchunks * n_eb * nblk, BLOCK_E * BLOCK_N), dtype=torch.float32, device=dev)
          if save_ck else None)
    if not launch:
        return out, ysum, ck if save_ck else hin
    part = _empty_like_layout(u, (batch, E, L), torch.float32)
    with _device_ctx(u):
        if nchunks > 1:
            hloc = torch.empty_like(hin)
            P = torch.empty_like(hloc)
            _fwd_chunk_state_kernel[(n_eb, batch, nchunks)](
                u, delta, A, B, delta_bias, hloc, P,
                batch, E, L, N, chunk, nchunks,
                *u.stride(), *delta.stride(), *B.stride(), 0,
                BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N, EVEN_N=BLOCK_N == N, PF=_PF, FAST=u.is_cuda, num_warps=_FWD_WARPS,
                **_launch_opts(u, _FWD_MAXNREG),
            )
            _combine(hloc, P, hin, batch, N * E, nchunks, reverse=False)
        _scan_fwd_kernel[(n_eb, batch, nchunks)](
            u, delta, A, B, C, D, delta_bias, z, hin if nchunks > 1 else part, part, out, ysum if save else out,
            ck if save_ck else part,
            batch, E, L, N, chunk, nchunks, nblk,
            *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z.stride(), *out.stride(), 0,
            BLOCK_E=BLOCK_E, BLOCK_N=BLOCK_N, LOG_N=BLOCK_N.bit_length() - 1, HAS_CARRY=nchunks > 1, SAVE_YSUM=save,
            SAVE_CK=save_ck, CK=_CK, EVEN_N=BLOCK_N == N, PF=_PF, FAST=u.is_cuda,
            num_warps=_FWD_WARPS, **_launch_opts(u, _FWD_MAXNREG),
        )
    return out, ysum, ck if save_ck else hin


def _combine(S, P, X, batch, NE, nchunks, reverse):
    BLOCK = 256
    _chunk_combine_kernel[(triton.cdiv(NE, BLOCK), batch, 2)](S, P, X, batch, NE, nchunks, REVERSE=reverse, BLOCK=BLOCK)


def _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ysum, hin, chunk, seg=None, saved_ck=False, launch=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias); dA, dB, dC, dD, d delta_bias in fp32. hin: the
    forward's chunk start states (empty for one chunk), or with saved_ck its level-1 checkpoints. launch=False:
    allocation only, as in `_scan_fwd`."""
    batch, E, L, N, A, D, delta_bias, B, C = _prep(u, delta, A, B, C, D, z, delta_bias)
    dev = u.device
    nchunks = triton.cdiv(L, chunk)
    SEG = seg or _SEG
    CK = _CK
    BLOCK_E = _BWD_BLOCK_E
    BLOCK_N = triton.next_power_of_2(N)
    n_eb = triton.cdiv(E, BLOCK_E)
    nblk = triton.cdiv(chunk, CK)
    if dout.stride(-1) != 1 and not _token_major(dout):
        dout = dout.contiguous()
    f32 = torch.float32
    du = _empty_like_layout(u, tuple(u.shape), u.dtype)
    ddelta = _empty_like_layout(delta, tuple(delta.shape), delta.dtype)
    dz = _empty_like_layout(z, tuple(z.shape), z.dtype)
    dB_part = torch.empty((n_eb, 2, batch, L, N), dtype=f32, device=dev)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty((batch * nchunks, 2, N, E), dtype=f32, device=dev)
    dD_part = torch.empty((batch * nchunks, 2, E), dtype=f32, device=dev)
    db_part = torch.empty_like(dD_part)
    if launch:
        with _device_ctx(u):
            Min = None
            if nchunks > 1:
                R = torch.empty((2, batch, nchunks, N, E), dtype=f32, device=dev)
                P = torch.empty_like(R)
                _bwd_chunk_state_kernel[(triton.cdiv(E, 32), batch, nchunks)](
                    delta, A, C, delta_bias, z, dout, R, P,
                    batch, E, L, N, chunk, nchunks,
                    *delta.stride(), *C.stride(), *z.stride(), *dout.stride(), 0,
                    BLOCK_E=32, BLOCK_N=BLOCK_N, EVEN_N=BLOCK_N == N, PF=_PF, FAST=u.is_cuda, num_warps=1,
                    **_launch_opts(u, _FWD_MAXNREG),
                )
                Min = torch.empty_like(R)
                _combine(R, P, Min, batch, N * E, nchunks, reverse=True)
            nprog = 2 * batch * nchunks * n_eb
            if saved_ck:
                if hin.shape != (nprog * nblk, BLOCK_E * BLOCK_N):
                    raise ValueError("the forward's checkpoints do not match the backward's blocks")
                ck = hin
            else:
                ck = torch.empty((nprog * nblk, BLOCK_E * BLOCK_N), dtype=f32, device=dev)
            ck2 = torch.empty((nprog * triton.cdiv(CK, SEG), BLOCK_E * BLOCK_N), dtype=f32, device=dev)
            _scan_bwd_kernel[(n_eb, batch, 2 * nchunks)](
                u, delta, A, B, C, D, delta_bias, z, dout, ysum,
                hin if nchunks > 1 and not saved_ck else ck, Min if Min is not None else ck, ck, ck2,
                du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, db_part,
                batch, E, L, N, chunk, nchunks, nblk,
                *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *z.stride(), *dout.stride(), *ysum.stride(),
                *du.stride(), *ddelta.stride(), *dz.stride(),
                0,
                BLOCK_E=BLOCK_E, LOG_C=BLOCK_E.bit_length() - 1, BLOCK_N=BLOCK_N,
                SCATTER=_scatter_levels(BLOCK_N, BLOCK_E, _BWD_WARPS), CK=CK, SEG=SEG, HAS_CARRY=nchunks > 1,
                SAVED_CK=saved_ck, EVEN_N=BLOCK_N == N, PF=_PF, FAST=u.is_cuda, num_warps=_BWD_WARPS,
                **_launch_opts(u, _BWD_MAXNREG),
            )
    dB = dB_part.sum(0).transpose(-1, -2)
    dC = dC_part.sum(0).transpose(-1, -2)
    return du, ddelta, dA_part.sum(0).transpose(1, 2), dB, dC, dD_part.sum(0), dz, db_part.sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# autograd: eager calls go through an autograd Function; under torch.compile, through a custom operator (a fake for
# shapes and strides, the same backward) that the compiler keeps as one opaque op (it cannot trace these launches)
# and fuses the model's other work around. The operator's dispatch costs more host time a call than the Function
# (BENCHMARKS.md, "torch.compile"), which eager training at small resolutions would pay.
# ----------------------------------------------------------------------------------------------------------------------
def _scan_grads(saved, dout, chunk, seg, saved_ck, backward):
    """Gradients of the 8 tensor inputs, in their dtypes, from the saved tensors (inputs, ysum, states)."""
    u, delta, A, B, C, D, z, delta_bias, ysum, hin = saved
    du, ddelta, dA, dB, dC, dD, dz, dbias = backward(dout, u, delta, A, B, C, D, z, delta_bias, ysum, hin, chunk, seg,
                                                     saved_ck)
    return (du, ddelta, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.to(D.dtype), dz,
            dbias.to(delta_bias.dtype))


def _chunk_length(u, chunk_size):
    """Tokens per chunk of the call with these inputs (what the backward needs of the forward's chunking)."""
    return _chunking(u.shape[1], u.shape[2], u.shape[3], chunk_size, u.device)[0]


class _ScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, chunk_size, seg, save_states):
        out, ysum, hin = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk_size, save=True, save_states=save_states)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ysum, hin)
        ctx.chunk, ctx.seg, ctx.saved_ck = _chunk_length(u, chunk_size), seg, _saves_checkpoints(True, save_states)
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_scan_grads(ctx.saved_tensors, dout, ctx.chunk, ctx.seg, ctx.saved_ck, _scan_bwd), None, None, None


@torch.library.custom_op("vim::bidirectional_scan", mutates_args=())
def _scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor,
             chunk_size: Optional[int], seg: Optional[int], save: bool, save_states: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, ysum, the backward's states); `seg` is the backward's (an argument here so that the backward sees it)."""
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk_size, save, save_states)


@_scan_op.register_fake
def _scan_op_fake(u, delta, A, B, C, D, z, delta_bias, chunk_size, seg, save, save_states):
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk_size, save, save_states, launch=False)


@torch.library.custom_op("vim::bidirectional_scan_backward", mutates_args=())
def _scan_bwd_op(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                 delta_bias: Tensor, ysum: Tensor, hin: Tensor, chunk: int, seg: Optional[int], saved_ck: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ysum, hin, chunk, seg, saved_ck)


@_scan_bwd_op.register_fake
def _scan_bwd_op_fake(dout, u, delta, A, B, C, D, z, delta_bias, ysum, hin, chunk, seg, saved_ck):
    return _scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, ysum, hin, chunk, seg, saved_ck, launch=False)


def _scan_op_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, chunk_size, seg, save, save_states = inputs
    _, ysum, hin = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ysum, hin)
    ctx.chunk, ctx.seg, ctx.saved = _chunk_length(u, chunk_size), seg, save
    ctx.saved_ck = _saves_checkpoints(save, save_states)


def _scan_op_backward(ctx, dout, *_):
    if not ctx.saved:
        raise RuntimeError("backward through a scan run with save=False (no gradients were required then)")
    return *_scan_grads(ctx.saved_tensors, dout, ctx.chunk, ctx.seg, ctx.saved_ck, _scan_bwd_op), None, None, None, None


_scan_op.register_autograd(_scan_op_backward, setup_context=_scan_op_setup_context)


def bidirectional_scan_triton(u, delta, A, B, C, D, z, delta_bias, chunk_size=None, seg=None, save_states=True):
    """Fused bidirectional selective scan; same contract as `kernels.bidirectional_scan`.

    Args:
        u, delta: (2, batch, E, L), index 0 forward, 1 backward, both in original token order; any strides
            (token-major views, channels contiguous, are the fast layout).
        A: (2, E, N); B, C: (2, batch, N, L); D, delta_bias: (2, E); z: (batch, E, L).
        chunk_size: tokens per chunk (None: chosen from the shape); tests use small values to cross chunk borders.
        seg: backward checkpoint interval in tokens (None: _SEG).
        save_states: when gradients are needed, the forward keeps the states the backward would otherwise recompute
            in its first sweep (fp32, every CK = 16 tokens: 8 bytes a channel and token for both directions): a faster
            backward for more saved memory (BENCHMARKS.md, "Selective scan kernel").
    Returns:
        (batch, E, L) in u's dtype: silu(z) * (y_fwd + y_bwd) / 2.
    """
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    if torch.compiler.is_compiling():
        return _scan_op(u, delta, A, B, C, D, z, delta_bias, chunk_size, seg, save, save_states)[0]
    if save:
        return _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, chunk_size, seg, save_states)
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, chunk_size)[0]
