"""Benchmark of `kernels.bidirectional_scan`: reference backend vs the Triton backend at the shapes of issue 3.

bf16 u / delta / B / C / z handed over as token-major views (what the model passes), fp32 A / D / delta_bias, N = 16.
Times are CUDA-event medians from triton.testing.do_bench. "fwd" is the training forward (inputs require grad, so
the kernel also saves y_fwd + y_bwd); "fwd+bwd" adds torch.autograd.grad of a fixed output gradient.

Floors, per shape: bytes = each input read once and each output written once, over the device-to-device copy
bandwidth measured in the same run; compute = exp count over the MUFU rate (16 / clock / SM) or instruction count over
the issue rate (128 lanes / clock / SM), whichever is larger (forward: 1 exp + 4 FP32 instructions per (direction,
batch, channel, state, token); the backward adds at least 1 exp (recomputed decay) + 11 FP32 instructions).
floor% = floor / measured. A call's host work (argument checks, the B / C copies, ~10 kernel launches) can exceed
the forward kernel's ~0.25 ms, so `--graph` times replays of a CUDA graph of the call instead (GPU time only).

    python bench/bench_scan.py [--shapes 0,1,2,3,4] [--no-ref] [--graph]
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from kernels import bidirectional_scan  # noqa: E402

N_STATE = 16
SHAPES = [  # (batch, E, L, what, reference CUDA path from issue 3: fwd ms, fwd+bwd ms)
    (128, 384, 197, "Vim-T 224", 0.95, 3.57),
    (64, 768, 197, "Vim-S 224", 0.95, 3.52),
    (32, 1536, 197, "Vim-B 224", 0.96, 3.51),
    (8, 384, 6085, "Vim-T 1248", 1.46, 6.54),
    (2, 768, 16384, "16k tokens", 1.49, 5.84),
]
REF_MAX_ELEMS = 2.0e8  # batch * E * L * N above which the (memory-hungry) reference backend is not timed


def token_major(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def make_inputs(batch, E, L, N=N_STATE, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=True):
    """Inputs shaped like the Vim mixer's: dt around softplus^-1 of 1e-3..1e-1, A = -exp(A_log) with S4D-real init."""
    g = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + shift

    u = token_major(r(2, batch, E, L).to(dtype))
    delta = token_major(r(2, batch, E, L, scale=0.5, shift=-4.0).to(dtype))
    A = -(torch.arange(1, N + 1, device=device, dtype=torch.float32).log()[None, None, :]
          + r(2, E, N, scale=0.1)).exp()
    B = token_major(r(2, batch, N, L).to(dtype))
    C = token_major(r(2, batch, N, L).to(dtype))
    D = torch.ones(2, E, device=device) + r(2, E, scale=0.1)
    z = token_major(r(batch, E, L).to(dtype))
    bias = r(2, E, scale=0.5, shift=-2.0)
    xs = [u, delta, A, B, C, D, z, bias]
    if requires_grad:
        xs = [x.requires_grad_() for x in xs]
    return xs


def time_backend(backend, xs, grad_out, graph=False):
    def fwd():
        return bidirectional_scan(*xs, backend=backend)

    def fwd_bwd():
        out = bidirectional_scan(*xs, backend=backend)
        return torch.autograd.grad(out, xs, grad_out)

    if graph:  # GPU time only (an eager call first compiles the kernels)
        fwd_bwd()
        return (do_bench_cudagraph(fwd, rep=200, return_mode="median"),
                do_bench_cudagraph(fwd_bwd, rep=200, return_mode="median"))
    t_f = do_bench(fwd, warmup=25, rep=200, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
    return t_f, t_fb


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / (t * 1e-3)


def sm_clock_hz():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return float(out[0]) * 1e6
    except Exception:  # noqa: BLE001 - a missing nvidia-smi only loses the clock; H100 SXM boost as fallback
        return 1.98e9


def floors(batch, E, L, N, bw, sms, clock):
    bel, bnl = batch * E * L, batch * N * L
    elems = 2 * bel * N
    fwd_bytes = (2 * 2 + 1 + 1) * bel * 2 + 2 * 2 * bnl * 2  # u, delta (2 dirs), z, out; B, C
    bwd_bytes = (2 * 2 + 1 + 1) * bel * 2 + 2 * 2 * bnl * 2 + (2 * 2 + 1) * bel * 2 + 2 * 2 * bnl * 2  # + dout, grads
    mufu, issue = 16 * sms * clock, 128 * sms * clock

    def compute(exps, instr):
        return max(exps / mufu, (exps + instr) / issue)

    f_fwd = max(fwd_bytes / bw, compute(elems, 4 * elems))
    f_fb = max((fwd_bytes + bwd_bytes) / bw, compute(2 * elems, 15 * elems))
    return f_fwd * 1e3, f_fb * 1e3, fwd_bytes / bw * 1e3, compute(elems, 4 * elems) * 1e3


def run(shapes=range(len(SHAPES)), with_ref=True, log=print, graph=False):
    props = torch.cuda.get_device_properties(0)
    sms, clock = props.multi_processor_count, sm_clock_hz()
    bw = copy_bandwidth()
    log(f"device: {props.name}, {sms} SMs, max SM clock {clock / 1e9:.2f} GHz, copy bandwidth {bw / 1e12:.2f} TB/s; "
        f"torch {torch.__version__}, triton {triton.__version__}"
        + ("; timed as CUDA-graph replays (GPU time, no host launch cost)" if graph else ""))
    rows = []
    for i in shapes:
        batch, E, L, what, cuda_f, cuda_fb = SHAPES[i]
        xs = make_inputs(batch, E, L)
        grad_out = token_major(torch.randn(batch, E, L, device="cuda").to(torch.bfloat16))
        t_f, t_fb = time_backend("triton", xs, grad_out, graph)
        ref = None
        if with_ref and batch * E * L * N_STATE <= REF_MAX_ELEMS:
            try:
                ref = time_backend("reference", xs, grad_out, graph)
            except torch.cuda.OutOfMemoryError:
                ref = None
            torch.cuda.empty_cache()
        f_fwd, f_fb, f_bytes, f_comp = floors(batch, E, L, N_STATE, bw, sms, clock)
        rows.append(dict(shape=(batch, E, L), what=what, triton_fwd=t_f, triton_fwdbwd=t_fb, ref=ref,
                         cuda_fwd=cuda_f, cuda_fwdbwd=cuda_fb, floor_fwd=f_fwd, floor_fwdbwd=f_fb))
        del xs, grad_out
        torch.cuda.empty_cache()
    log("")
    log("| shape (batch, E, L) | what | reference fwd / fwd+bwd ms | CUDA path (issue) fwd / fwd+bwd ms "
        "| Triton fwd ms | Triton fwd+bwd ms | floor fwd / fwd+bwd ms | % of floor fwd / fwd+bwd |")
    log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['ref'][0]:.2f} / {r['ref'][1]:.2f}" if r["ref"] else "not run (memory/time cap)"
        log(f"| {', '.join(map(str, r['shape']))} | {r['what']} | {ref} | {r['cuda_fwd']:.2f} / {r['cuda_fwdbwd']:.2f} "
            f"| {r['triton_fwd']:.3f} | {r['triton_fwdbwd']:.3f} | {r['floor_fwd']:.3f} / {r['floor_fwdbwd']:.3f} "
            f"| {100 * r['floor_fwd'] / r['triton_fwd']:.0f}% / {100 * r['floor_fwdbwd'] / r['triton_fwdbwd']:.0f}% |")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))))
    p.add_argument("--no-ref", action="store_true", help="skip the reference backend")
    p.add_argument("--graph", action="store_true", help="time replays of a CUDA graph of each call (GPU time only)")
    a = p.parse_args()
    run([int(s) for s in a.shapes.split(",")], with_ref=not a.no_ref, graph=a.graph)
