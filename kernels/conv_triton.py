"""Fused bidirectional depthwise conv1d + SiLU (Vim v2 mixer's two convs) in Triton: forward, backward, autograd (a
Function, and a custom operator for torch.compile).

What is fused
- Forward: ONE launch for both directions. A program owns (BLOCK_T tokens, BLOCK_E channels, one batch row) and loads
  the BLOCK_T + 2 (K - 1) rows of x that its outputs need once, each row a [BLOCK_E] vector (coalesced along the
  channels), kept in registers as a compile-time tuple. The token loop is unrolled at compile time, so each tap of
  the window is a tuple index (no shared memory, no reloads). It writes silu(bias + conv) of both directions, u[0]
  causal and u[1] anti-causal, token-major: (2, batch, L, E) contiguous, the layout the scan reads with coalesced
  loads. x is read through its own strides (the model passes the first half of the in_proj output, a view).
- Backward: ONE launch. A program owns (BLOCK_T tokens, BLOCK_E channels) and loops over a group of batch rows. Only
  x, weight and bias are saved: it reloads the same x rows, recomputes both pre-activations, forms
  g_d = du_d * silu'(p_d) on the block plus the K - 1 halo tokens that dx needs, writes dx (both directions summed,
  in x's dtype) and keeps per-channel sums for dweight and dbias in registers across its batch rows.
- Determinism: no atomics. dweight and dbias are written as one partial row per program (token block x batch group)
  and summed with torch; batch rows are grouped only as far as the GPU stays filled, to keep those partials small.

Known limits
- K <= 8 (the token loop is unrolled; Vim uses K = 4); batch <= 65535 (a grid axis). Arithmetic in fp32; x fp32,
  bf16 or fp16, weight and bias any float dtype (converted to fp32, gradients returned in their dtype).
- Memory-bound. The floor is reading x once and writing u (forward), reading x and du and writing dx (backward); the
  2 (K - 1) halo rows of a block are read again by its neighbour (mostly from L2), and the backward recomputes g on
  K - 1 halo tokens per block and direction.
- Under TRITON_INTERPRET=1 it runs on CPU tensors (slowly): that is how the tests run without a GPU.
"""
import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._checks import check_conv_inputs
from .scan_triton import _cast, _sigmoid

__all__ = ["bidirectional_conv1d_silu_triton"]


# ----------------------------------------------------------------------------------------------------------------------
# forward: both directions in one program
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, u_ptr,
    # dimensions
    batch, L, E,
    # strides
    sx_b, sx_l, sx_e,
    # meta-parameters
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, FAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    me = e < E
    t0 = pid_t * BLOCK_T

    # weight is (2, K, E) fp32 here, so every tap is a coalesced [BLOCK_E] load
    w0 = ()
    w1 = ()
    for k in tl.static_range(K):
        w0 = w0 + (tl.load(w_ptr + k * E + e, mask=me, other=0.0),)
        w1 = w1 + (tl.load(w_ptr + (K + k) * E + e, mask=me, other=0.0),)
    bias0 = tl.load(b_ptr + e, mask=me, other=0.0)
    bias1 = tl.load(b_ptr + E + e, mask=me, other=0.0)

    # xs[j] = x[t0 - (K - 1) + j], zero outside 0..L-1 (the convolution's zero padding)
    x_row = x_ptr + b * sx_b + e * sx_e
    xs = ()
    for j in tl.static_range(BLOCK_T + 2 * (K - 1)):
        t = t0 - (K - 1) + j
        xs = xs + (tl.load(x_row + t * sx_l, mask=me & (t >= 0) & (t < L), other=0.0).to(tl.float32),)

    u0 = u_ptr + b * L * E + e
    u1 = u_ptr + (batch + b) * L * E + e
    for i in tl.static_range(BLOCK_T):
        t = t0 + i
        p0 = bias0
        p1 = bias1
        for k in tl.static_range(K):
            p0 += w0[k] * xs[i + k]                  # x[t - (K - 1) + k]
            p1 += w1[k] * xs[i + 2 * (K - 1) - k]    # x[t + (K - 1) - k]
        mt = me & (t < L)
        tl.store(u0 + t * E, _cast(p0 * _sigmoid(p0), u_ptr.dtype.element_ty, FAST), mask=mt)
        tl.store(u1 + t * E, _cast(p1 * _sigmoid(p1), u_ptr.dtype.element_ty, FAST), mask=mt)


# ----------------------------------------------------------------------------------------------------------------------
# backward: dx for both directions, per-program partial sums of dweight and dbias
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_bwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, du_ptr, dx_ptr, dw_ptr, db_ptr,
    # dimensions
    batch, L, E, batch_per_prog,
    # strides
    sx_b, sx_l, sx_e,
    sg_d, sg_b, sg_l, sg_e,
    sdx_b, sdx_l, sdx_e,
    # meta-parameters
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, FAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    me = e < E
    t0 = pid_t * BLOCK_T
    kk = tl.arange(0, BLOCK_K)

    w0 = ()
    w1 = ()
    for k in tl.static_range(K):
        w0 = w0 + (tl.load(w_ptr + k * E + e, mask=me, other=0.0),)
        w1 = w1 + (tl.load(w_ptr + (K + k) * E + e, mask=me, other=0.0),)
    bias0 = tl.load(b_ptr + e, mask=me, other=0.0)
    bias1 = tl.load(b_ptr + E + e, mask=me, other=0.0)

    # dweight sums as [BLOCK_K, BLOCK_E] tiles (tap k in row k): plain tensors, carried through the batch loop
    dw0 = tl.zeros([BLOCK_K, BLOCK_E], tl.float32)
    dw1 = tl.zeros([BLOCK_K, BLOCK_E], tl.float32)
    db0 = tl.zeros([BLOCK_E], tl.float32)
    db1 = tl.zeros([BLOCK_E], tl.float32)
    for bi in range(0, batch_per_prog):
        b = pid_b * batch_per_prog + bi
        mb = me & (b < batch)
        b64 = b.to(tl.int64)
        # xs[j] = x[t0 - (K - 1) + j], as in the forward
        x_row = x_ptr + b64 * sx_b + e * sx_e
        xs = ()
        for j in tl.static_range(BLOCK_T + 2 * (K - 1)):
            t = t0 - (K - 1) + j
            xs = xs + (tl.load(x_row + t * sx_l, mask=mb & (t >= 0) & (t < L), other=0.0).to(tl.float32),)
        # g0[i] = du_0 silu'(p_0) at token t0 + i; g1[i] at token t0 - (K - 1) + i: the rows dx of the block reads.
        # du is 0 outside 0..L-1 (masked load), so g is too.
        g_row = du_ptr + b64 * sg_b + e * sg_e
        g0 = ()
        g1 = ()
        for i in tl.static_range(BLOCK_T + K - 1):
            p0 = bias0
            p1 = bias1
            for k in tl.static_range(K):
                p0 += w0[k] * xs[i + k]
                p1 += w1[k] * xs[i + (K - 1) - k]
            ta = t0 + i
            tb = t0 - (K - 1) + i
            da = tl.load(g_row + ta * sg_l, mask=mb & (ta < L), other=0.0).to(tl.float32)
            dbk = tl.load(g_row + sg_d + tb * sg_l, mask=mb & (tb >= 0) & (tb < L), other=0.0).to(tl.float32)
            s0 = _sigmoid(p0)
            s1 = _sigmoid(p1)
            g0 = g0 + (da * s0 * (1.0 + p0 * (1.0 - s0)),)
            g1 = g1 + (dbk * s1 * (1.0 + p1 * (1.0 - s1)),)

        dx_row = dx_ptr + b64 * sdx_b + e * sdx_e
        for i in tl.static_range(BLOCK_T):
            t = t0 + i
            acc = tl.zeros([BLOCK_E], tl.float32)
            for k in tl.static_range(K):
                acc += w0[k] * g0[i + (K - 1) - k] + w1[k] * g1[i + k]
            tl.store(dx_row + t * sdx_l, _cast(acc, dx_ptr.dtype.element_ty, FAST), mask=mb & (t < L))

        # this batch row's contribution of the block's own tokens t0 + i (g1 index i + K - 1)
        for k in tl.static_range(K):
            c0 = g0[0] * xs[k]
            c1 = g1[K - 1] * xs[2 * (K - 1) - k]
            for i in tl.static_range(1, BLOCK_T):
                c0 += g0[i] * xs[i + k]
                c1 += g1[i + K - 1] * xs[i + 2 * (K - 1) - k]
            dw0 += tl.where(kk[:, None] == k, c0[None, :], 0.0)
            dw1 += tl.where(kk[:, None] == k, c1[None, :], 0.0)
        for i in tl.static_range(BLOCK_T):
            db0 += g0[i]
            db1 += g1[i + K - 1]

    # partial rows: (programs along tokens x batch groups, 2, K, E) and (..., 2, E)
    row = (pid_t * tl.num_programs(2) + pid_b).to(tl.int64)
    m2 = (kk[:, None] < K) & me[None, :]
    w_off = kk[:, None] * E + e[None, :]
    tl.store(dw_ptr + row * 2 * K * E + w_off, dw0, mask=m2)
    tl.store(dw_ptr + (row * 2 + 1) * K * E + w_off, dw1, mask=m2)
    tl.store(db_ptr + row * 2 * E + e, db0, mask=me)
    tl.store(db_ptr + (row * 2 + 1) * E + e, db1, mask=me)


# ----------------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------------
_MAX_K = 8
_FWD_BLOCK_T = 32            # forward: tokens per program (unrolled)
_FWD_BLOCK_E = 128           # forward: channels per program
_FWD_WARPS = 2               # 2 channels per thread at BLOCK_E 128: 4-byte bf16 loads, 128 bytes per warp and row
_BWD_BLOCK_T = 16            # backward: tokens per program; registers grow with it (x, du and g rows are all live)
_BWD_BLOCK_E = 128
_BWD_WARPS = 4
_BWD_PROGRAMS_PER_SM = 4     # batch rows are grouped per program only while this many programs per SM remain
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _prep(x, weight, bias):
    batch, L, E, K = check_conv_inputs(x, weight, bias)
    if K > _MAX_K:
        raise ValueError(f"the Triton conv supports kernel sizes K <= {_MAX_K}, got {K}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"the Triton conv supports x in {_DTYPES}, got {x.dtype}")
    if batch > 65535:
        raise ValueError(f"the Triton conv supports batch <= 65535 (a grid axis), got {batch}")
    w = weight.float().transpose(1, 2).contiguous()   # (2, K, E): a tap's channels are contiguous
    return batch, L, E, K, w, bias.float().contiguous()


def _device_ctx(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _conv_fwd(x, weight, bias, launch=True):
    """Returns u (2, batch, L, E) contiguous in x's dtype. launch=False: allocation only (the custom op's fake)."""
    batch, L, E, K, w, b = _prep(x, weight, bias)
    u = torch.empty((2, batch, L, E), dtype=x.dtype, device=x.device)
    if not launch:
        return u
    grid = (triton.cdiv(L, _FWD_BLOCK_T), triton.cdiv(E, _FWD_BLOCK_E), batch)
    with _device_ctx(x):
        _conv_fwd_kernel[grid](
            x, w, b, u,
            batch, L, E,
            *x.stride(),
            K=K, BLOCK_T=_FWD_BLOCK_T, BLOCK_E=_FWD_BLOCK_E, FAST=x.is_cuda, num_warps=_FWD_WARPS,
        )
    return u


def _batch_per_program(batch, programs, device):
    """Batch rows per backward program: all of them in one program would serialise the work, one each would write a
    partial row per (token block, batch row); group only down to _BWD_PROGRAMS_PER_SM programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    groups = min(batch, max(1, triton.cdiv(_BWD_PROGRAMS_PER_SM * sms, programs)))
    return triton.cdiv(batch, groups)


def _conv_bwd(du, x, weight, bias, batch_per_program=None, launch=True):
    """du: (2, batch, L, E), any strides. Returns dx (batch, L, E) in x's dtype; dweight (2, E, K), dbias (2, E) in
    fp32. launch=False: allocation only."""
    batch, L, E, K, w, b = _prep(x, weight, bias)
    if tuple(du.shape) != (2, batch, L, E):
        raise ValueError(f"du must have shape {(2, batch, L, E)}, got {tuple(du.shape)}")
    n_t, n_e = triton.cdiv(L, _BWD_BLOCK_T), triton.cdiv(E, _BWD_BLOCK_E)
    bpp = batch_per_program or _batch_per_program(batch, n_t * n_e, x.device)
    n_b = triton.cdiv(batch, bpp)
    dx = torch.empty((batch, L, E), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((n_t * n_b, 2, K, E), dtype=torch.float32, device=x.device)
    db_part = torch.empty((n_t * n_b, 2, E), dtype=torch.float32, device=x.device)
    if launch:
        with _device_ctx(x):
            _conv_bwd_kernel[(n_t, n_e, n_b)](
                x, w, b, du, dx, dw_part, db_part,
                batch, L, E, bpp,
                *x.stride(), *du.stride(), *dx.stride(),
                K=K, BLOCK_K=triton.next_power_of_2(K), BLOCK_T=_BWD_BLOCK_T, BLOCK_E=_BWD_BLOCK_E, FAST=x.is_cuda,
                num_warps=_BWD_WARPS,
            )
    return dx, dw_part.sum(0).transpose(1, 2).contiguous(), db_part.sum(0)


# ----------------------------------------------------------------------------------------------------------------------
# autograd: a Function for eager calls, a custom operator under torch.compile (why: scan_triton.py)
# ----------------------------------------------------------------------------------------------------------------------
def _conv_grads(saved, du, batch_per_program, backward):
    x, weight, bias = saved
    dx, dw, db = backward(du, x, weight, bias, batch_per_program)
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, batch_per_program):
        ctx.save_for_backward(x, weight, bias)
        ctx.batch_per_program = batch_per_program
        return _conv_fwd(x, weight, bias)

    @staticmethod
    def backward(ctx, du):
        return *_conv_grads(ctx.saved_tensors, du, ctx.batch_per_program, _conv_bwd), None


@torch.library.custom_op("vim::bidirectional_conv1d_silu", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Tensor, batch_per_program: Optional[int]) -> Tensor:
    """`batch_per_program` is the backward's."""
    return _conv_fwd(x, weight, bias)


@_conv_op.register_fake
def _conv_op_fake(x, weight, bias, batch_per_program):
    return _conv_fwd(x, weight, bias, launch=False)


@torch.library.custom_op("vim::bidirectional_conv1d_silu_backward", mutates_args=())
def _conv_bwd_op(du: Tensor, x: Tensor, weight: Tensor, bias: Tensor, batch_per_program: Optional[int]
                 ) -> tuple[Tensor, Tensor, Tensor]:
    return _conv_bwd(du, x, weight, bias, batch_per_program)


@_conv_bwd_op.register_fake
def _conv_bwd_op_fake(du, x, weight, bias, batch_per_program):
    return _conv_bwd(du, x, weight, bias, batch_per_program, launch=False)


def _conv_op_setup_context(ctx, inputs, output):
    x, weight, bias, batch_per_program = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.batch_per_program = batch_per_program


def _conv_op_backward(ctx, du):
    return *_conv_grads(ctx.saved_tensors, du, ctx.batch_per_program, _conv_bwd_op), None


_conv_op.register_autograd(_conv_op_backward, setup_context=_conv_op_setup_context)


def bidirectional_conv1d_silu_triton(x, weight, bias, batch_per_program=None):
    """Fused bidirectional depthwise conv1d + SiLU; same contract as `kernels.bidirectional_conv1d_silu`.

    Args:
        x: (batch, L, E), any strides; fp32, bf16 or fp16.
        weight: (2, E, K), K <= 8; bias: (2, E); index 0 forward (causal), 1 backward (anti-causal).
        batch_per_program: batch rows per backward program (None: chosen from the shape); tests set it to cross
            the batch-group border.
    Returns:
        u: (2, batch, L, E) contiguous, in x's dtype.
    """
    if torch.compiler.is_compiling():
        return _conv_op(x, weight, bias, batch_per_program)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias)):
        return _ConvFn.apply(x, weight, bias, batch_per_program)
    return _conv_fwd(x, weight, bias)
