"""Sweep of the Triton scan's tuning constants (module-level knobs of kernels/scan_triton.py) on the GPU.

A setting is either the backward's positional form "CK,SEG,MAXNREG[,WARPS[,BLOCK_E]]" (MAXNREG 0 = no cap, WARPS
default 1, BLOCK_E, the channels a program, default 32), named knobs "PF=8,WAVES=2,CK=8" (any knob of the module,
without its leading underscore; 0 or None for MAXNREG means no cap) or "shipped" (the module's values). Each
setting is checked against the shipped one's gradients (same inputs; they differ only by float summation order)
before it is timed; fwd and fwd+bwd medians as in bench_scan.py (eager calls, or CUDA-graph replays with --graph).
(The name is historical: it first swept only the backward's knobs.)

    python bench/sweep_scan_bwd.py [--shapes 0,3] [--graph] [--settings 16,2,0 8,2,0,2 PF=0 PF=8,WAVES=2 ...]
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

DEFAULT_SETTINGS = ["shipped", "CK=8", "CK=32", "SEG=4"]
POSITIONAL = ("CK", "SEG", "BWD_MAXNREG", "BWD_WARPS", "BWD_BLOCK_E")
SHOWN = ("CK", "SEG", "BWD_MAXNREG", "BWD_WARPS", "BWD_BLOCK_E", "FWD_MAXNREG", "PF", "WAVES")


def parse_setting(setting):
    """{knob name without underscore: value} from either form of a setting string ("shipped": none changed)."""
    if setting == "shipped":
        return {}
    if "=" not in setting:
        values = [int(v) for v in setting.split(",")]
        return dict(zip(POSITIONAL, values + [0, 0, 0, 1, 32][len(values):]))
    knobs = {}
    for item in setting.split(","):
        name, value = item.split("=")
        if not hasattr(scan_triton, "_" + name):
            raise ValueError(f"kernels/scan_triton.py has no knob _{name}")
        knobs[name] = None if value == "None" else int(value)
    return knobs


@contextlib.contextmanager
def scan_setting(setting):
    """The module's knobs set from a setting string inside the block (yields the values of SHOWN), the shipped ones
    restored after it."""
    knobs = parse_setting(setting)
    shipped = {k: getattr(scan_triton, "_" + k) for k in knobs}
    for k, v in knobs.items():
        setattr(scan_triton, "_" + k, (v or None) if k.endswith("MAXNREG") else v)
    try:
        yield tuple(getattr(scan_triton, "_" + k) for k in SHOWN)
    finally:
        for k, v in shipped.items():
            setattr(scan_triton, "_" + k, v)


def gradients(xs, grad_out):
    out = bidirectional_scan(*xs, backend="triton")
    return torch.autograd.grad(out, xs, grad_out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="0,3")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays (GPU time only)")
    a = p.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; shipped: "
          + ", ".join(f"{k} {getattr(scan_triton, '_' + k)}" for k in SHOWN)
          + ("; CUDA-graph replays" if a.graph else "; eager calls"))
    cases = []
    for i in (int(s) for s in a.shapes.split(",")):
        batch, E, L, what = SHAPES[i][:4]
        xs = make_inputs(batch, E, L)
        grad_out = token_major(torch.randn(batch, E, L, device="cuda").to(torch.bfloat16))
        cases.append((what, xs, grad_out, gradients(xs, grad_out)))
    print("| " + ", ".join(SHOWN) + " | "
          + " | ".join(f"{c[0]} fwd / fwd+bwd ms (max rel. diff)" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    for setting in a.settings:
        with scan_setting(setting) as values:
            cells = []
            for what, xs, grad_out, ref in cases:
                got = gradients(xs, grad_out)
                diff = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                           for g, r in zip(got, ref))
                t_f, t_fb = time_backend("triton", xs, grad_out, a.graph)
                cells.append(f"{t_f:.3f} / {t_fb:.3f} ({diff:.1e})")
        print("| " + ", ".join(str(v) for v in values) + " | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
