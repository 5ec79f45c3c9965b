"""Host time of one eager call of the Triton scan and conv (forward, and forward + backward) at a tiny shape, where the
GPU work is negligible: what the Python launchers and their autograd / custom-operator wrapping cost per call.

    python bench/bench_op_overhead.py [--calls 2000]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels.conv_triton import bidirectional_conv1d_silu_triton  # noqa: E402
from kernels.scan_triton import bidirectional_scan_triton  # noqa: E402


def host_us(fn, calls):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    batch, E, L, N = 1, 64, 16, 16

    def leaf(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda") * scale + shift).requires_grad_()

    scan_in = [leaf(2, batch, E, L), leaf(2, batch, E, L, shift=-1.0), leaf(2, E, N, scale=0.1, shift=-1.0),
               leaf(2, batch, N, L), leaf(2, batch, N, L), leaf(2, E), leaf(batch, E, L), leaf(2, E)]
    conv_in = [leaf(batch, L, E), leaf(2, E, 4), leaf(2, E)]
    cases = {"scan": lambda: bidirectional_scan_triton(*scan_in),
             "conv": lambda: bidirectional_conv1d_silu_triton(*conv_in)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: microseconds a call (mean of {a.calls}), "
          f"batch {batch}, E {E}, L {L}")
    for name, call in cases.items():
        with torch.no_grad():
            fwd = host_us(call, a.calls)
        fwd_bwd = host_us(lambda: call().sum().backward(), a.calls)
        print(f"{name}: forward {fwd:.1f} us, forward + backward {fwd_bwd:.1f} us", flush=True)


if __name__ == "__main__":
    main()
