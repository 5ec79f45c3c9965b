"""The mixer's x_proj / dt_proj matmuls of both directions, forward + backward, in four layouts, on one GPU.

Vim-T's x_proj output is dt_rank + 2 * d_state = 12 + 32 = 44 columns and dt_proj's inner size is 12: neither is
a multiple of 8 bf16 elements, which keeps cuBLAS off its fastest tensor-core kernels. Layouts timed:
  batched   one bmm for both directions, the 44-wide output split into views
  padded    the same with dt_rank zero-padded to a multiple of 8 (x_proj rows and dt_proj columns of zeros added
            to the weights on the fly), so every matmul dimension and every view's offset is 16-byte aligned (the
            model since the ninth session)
  per-dir   F.linear per direction
  split     the batched layout with the images cut into groups that act as extra matmul batches (the weights
            expanded to match): each weight gradient is then many short reductions, summed by the expand's
            backward, instead of one reduction over every token of the batch in a handful of output tiles
The four compute the same delta, B and C (checked against float64 first). bf16 autocast, fp32 weights,
CUDA-event medians of forward + backward (gradients of u and of the weights).

    python bench/bench_projections.py [--profile]   (--profile: each layout's GPU time a step and slowest kernels)
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import cuda_median_ms  # noqa: E402

SHAPES = [  # (name, batch, L, E, dt_rank, d_state)
    ("Vim-T 224 train (128 x 197)", 128, 197, 384, 12, 16),
    ("Vim-S 224 train (128 x 197)", 128, 197, 768, 24, 16),
    ("Vim-B 224 train (128 x 197)", 128, 197, 1536, 48, 16),
    ("Vim-T 1248 (8 x 6085)", 8, 6085, 384, 12, 16),
    ("Vim-T 32 px CIFAR (512 x 65)", 512, 65, 384, 12, 16),
]
SPLIT_GROUPS = 16  # image groups of the split layout (a divisor of the batch is used)


def batched(u, x_w, dt_w, R, N, batch):
    x_dbl = u @ x_w.transpose(1, 2)
    dt_low, B, C = x_dbl.split([R, N, N], dim=-1)
    return dt_low @ dt_w.transpose(1, 2), B, C


def padded(u, x_w, dt_w, R, N, batch):
    pad = -R % 8
    zeros = x_w.new_zeros(2, pad, x_w.shape[-1])
    x_dbl = u @ torch.cat([x_w[:, :R], zeros, x_w[:, R:]], dim=1).transpose(1, 2)
    delta = x_dbl[..., :R + pad] @ F.pad(dt_w, (0, pad)).transpose(1, 2)
    return delta, x_dbl[..., R + pad:R + pad + N], x_dbl[..., R + pad + N:]


def per_direction(u, x_w, dt_w, R, N, batch):
    outs = []
    for d in range(2):
        dt_low, B, C = F.linear(u[d], x_w[d]).split([R, N, N], dim=-1)
        outs.append((F.linear(dt_low, dt_w[d]), B, C))
    return [torch.stack(t) for t in zip(*outs)]


def split(u, x_w, dt_w, R, N, batch):
    groups = math.gcd(batch, SPLIT_GROUPS)
    D, T, E = u.shape
    grouped = u.reshape(D * groups, T // groups, E)

    def expand(w):
        return w[:, None].expand(D, groups, *w.shape[1:]).flatten(0, 1)

    x_dbl = grouped @ expand(x_w).transpose(1, 2)
    dt_low, B, C = x_dbl.split([R, N, N], dim=-1)
    delta = dt_low @ expand(dt_w).transpose(1, 2)
    return [t.reshape(D, T, -1) for t in (delta, B, C)]


LAYOUTS = {"batched": batched, "padded": padded, "per-dir": per_direction, "split": split}


def profile(inputs, R, N, batch):
    """The GPU time of a forward + backward step of each layout (all its kernels, averaged over 10 steps) and the
    five kernels taking the most of it."""
    u, x_w, dt_w, grads = inputs
    for name, layout in LAYOUTS.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs = layout(u, x_w, dt_w, R, N, batch)
                torch.autograd.backward(outs, grads)
            torch.cuda.synchronize()
        averages = prof.key_averages()
        total = sum(e.self_device_time_total for e in averages) / 10e3
        events = sorted(averages, key=lambda e: -e.device_time_total)[:5]
        print(f"{name}: GPU {total:.3f} ms a step; "
              + "; ".join(f"{e.key[:70]} x{e.count // 10}: {e.device_time_total / 10e3:.3f} ms" for e in events),
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="GPU time and slowest kernels of each layout (Vim-T)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | " + " | ".join(f"{k} fwd+bwd ms" for k in LAYOUTS) + " | max rel. error vs fp64 |")
    print("|---|" + "---|" * (len(LAYOUTS) + 1))
    for name, batch, L, E, R, N in SHAPES:
        T = batch * L
        u = torch.randn(2, T, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x_w = (torch.randn(2, R + 2 * N, E, device="cuda") / math.sqrt(E)).requires_grad_()
        dt_w = (torch.randn(2, E, R, device="cuda") / math.sqrt(R)).requires_grad_()
        grads = [torch.randn(2, T, c, device="cuda", dtype=torch.bfloat16) for c in (E, N, N)]
        exact = batched(u.double(), x_w.double(), dt_w.double(), R, N, batch)
        errors, times = [], []
        for layout in LAYOUTS.values():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layout(u, x_w, dt_w, R, N, batch)
            errors.append(max(((o.double() - e).norm() / e.norm()).item() for o, e in zip(out, exact)))

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    outs = layout(u, x_w, dt_w, R, N, batch)
                torch.autograd.backward(outs, grads)

            times.append(cuda_median_ms(step, steps=50, warmup=10))
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {max(errors):.1e} |", flush=True)
        if args.profile and name.startswith("Vim-T"):
            profile((u, x_w, dt_w, grads), R, N, batch)


if __name__ == "__main__":
    main()
