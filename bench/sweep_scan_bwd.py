"""Sweep of the Triton scan backward's tuning constants (kernels/scan_triton.py: _CK, _SEG, _BWD_MAXNREG, _BWD_WARPS,
_BWD_BLOCK_E) on the GPU.

Each setting is checked against the shipped one's gradients (same inputs; they differ only by float summation
order) before it is timed; fwd and fwd+bwd CUDA-event medians as in bench_scan.py.

    python bench/sweep_scan_bwd.py [--shapes 0,3] [--settings 16,2,0 8,2,0,2 16,2,0,1,16 ...]
    (CK,SEG,MAXNREG[,WARPS[,BLOCK_E]]; MAXNREG 0 = no cap, WARPS default 1, BLOCK_E (channels a program) default 32)
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

from bench.bench_scan import SHAPES, make_inputs, time_backend, token_major  # noqa: E402
from kernels import bidirectional_scan, scan_triton  # noqa: E402

DEFAULT_SETTINGS = ["16,2,0", "8,2,0", "32,2,0", "16,4,0"]
KNOBS = ("_CK", "_SEG", "_BWD_MAXNREG", "_BWD_WARPS", "_BWD_BLOCK_E")


@contextlib.contextmanager
def scan_setting(setting):
    """The backward's knobs set from "CK,SEG,MAXNREG[,WARPS[,BLOCK_E]]" inside the block (yields the five values),
    the shipped ones restored after it."""
    values = [int(v) for v in setting.split(",")]
    ck, seg, nreg, warps, block_e = values + [0, 0, 0, 1, 32][len(values):]
    shipped = tuple(getattr(scan_triton, k) for k in KNOBS)
    for k, v in zip(KNOBS, (ck, seg, nreg or None, warps, block_e)):
        setattr(scan_triton, k, v)
    try:
        yield ck, seg, nreg, warps, block_e
    finally:
        for k, v in zip(KNOBS, shipped):
            setattr(scan_triton, k, v)


def gradients(xs, grad_out):
    out = bidirectional_scan(*xs, backend="triton")
    return torch.autograd.grad(out, xs, grad_out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0,3")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; shipped: "
          + ", ".join(f"{k.strip('_')} {getattr(scan_triton, k)}" for k in KNOBS))
    cases = []
    for i in (int(s) for s in a.shapes.split(",")):
        batch, E, L, what = SHAPES[i][:4]
        xs = make_inputs(batch, E, L)
        grad_out = token_major(torch.randn(batch, E, L, device="cuda").to(torch.bfloat16))
        cases.append((what, xs, grad_out, gradients(xs, grad_out)))
    print("| CK, SEG, maxnreg, warps, channels | "
          + " | ".join(f"{c[0]} fwd / fwd+bwd ms (max rel. diff)" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for setting in a.settings:
        with scan_setting(setting) as (ck, seg, nreg, warps, block_e):
            cells = []
            for what, xs, grad_out, ref in cases:
                got = gradients(xs, grad_out)
                diff = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                           for g, r in zip(got, ref))
                t_f, t_fb = time_backend("triton", xs, grad_out)
                cells.append(f"{t_f:.3f} / {t_fb:.3f} ({diff:.1e})")
        print(f"| {ck}, {seg}, {nreg or 'none'}, {warps}, {block_e} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
