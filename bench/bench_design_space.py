"""Speed of the design-space variants on one GPU: Vim-T at 224 (1000 classes), synthetic inputs on the GPU.

Per variant (bidir_mode x 5, scan_orders 2 vs 4 directions, one pooled-head cls_mode) and batch size: the training
step (forward + cross-entropy + backward + fused AdamW, bf16 autocast, parameters fp32) and inference (forward under
no_grad, bf16 autocast), CUDA-event medians; then the scan kernels alone at Vim-T's shape. First it checks the
compiled multidirectional kernel against the reference on the GPU. About 2 minutes on one H100, Triton compilation
included.

    python bench/bench_design_space.py [--batch 128 64] [--steps 10] [--warmup 3]
    python bench/bench_design_space.py --params          # the parameter-count table of the README (CPU only)
"""
import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401  (registers the Vim models)
from bench.timing import cuda_median_ms  # noqa: E402

FOUR = ["row", "row_reverse", "col", "col_reverse"]
SPEED_VARIANTS = [
    ("v2 (default: middle, row + row_reverse)", {}),
    ("bidir_mode=ssm", {"bidir_mode": "ssm"}),
    ("bidir_mode=block", {"bidir_mode": "block"}),
    ("bidir_mode=sequence", {"bidir_mode": "sequence"}),
    ("bidir_mode=none", {"bidir_mode": "none"}),
    ("scan_orders=4 directions (row, col, reversed)", {"scan_orders": FOUR}),
    ("cls_mode=mean", {"cls_mode": "mean"}),
]
PARAM_VARIANTS = [
    *[(f"cls_mode={m}", {"cls_mode": m}) for m in models.CLS_MODES],
    *[(f"bidir_mode={m}", {"bidir_mode": m}) for m in ("none", "sequence", "block", "ssm", "v2")],
    ("scan_orders=[row, row_reverse] (2 directions, = v2)", {"scan_orders": FOUR[:2]}),
    ("scan_orders=[row, row_reverse, col, col_reverse] (4)", {"scan_orders": FOUR}),
    ("scan_orders=4 + [diag, diag_reverse] (6)", {"scan_orders": FOUR + ["diag", "diag_reverse"]}),
]


def print_params():
    print("| Vim-T at 224, variant (other keys at their defaults) | parameters |\n|---|---|")
    for label, kwargs in PARAM_VARIANTS:
        model = timm.create_model("vim_tiny_patch16_224", **kwargs)
        print(f"| {label} | {sum(p.numel() for p in model.parameters()):,} |")


def bench_model(kwargs, batch, steps, warmup, device):
    """(train step ms, inference ms, peak GiB of the training step) of Vim-T with `kwargs`."""
    torch.cuda.reset_peak_memory_stats()
    model = timm.create_model("vim_tiny_patch16_224", **kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)

    model.train()
    train_ms = cuda_median_ms(train_step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    infer_ms = cuda_median_ms(infer, steps, warmup)
    return train_ms, infer_ms, peak


def bench_kernels(batch, device):
    """fwd / fwd+bwd ms of the scans at Vim-T's shape: bidirectional_scan vs multidirectional_scan (K = 2, 4)."""
    from triton.testing import do_bench
    import kernels
    E, L, N = 384, 197, 16
    rows = []
    for label, K in (("bidirectional_scan (2)", 2), ("multidirectional_scan, row + row_reverse (2)", 2),
                     ("multidirectional_scan, 4 directions (4)", 4)):
        def tm(*shape):   # token-major bf16 views, as the model hands them over
            return torch.randn(*shape[:-2], shape[-1], shape[-2], device=device).to(torch.bfloat16).transpose(-1, -2)
        u, delta, B, C = tm(K, batch, E, L), tm(K, batch, E, L) * 0.5 - 1, tm(K, batch, N, L), tm(K, batch, N, L)
        z = tm(batch, E, L)
        A = -torch.exp(torch.randn(K, E, N, device=device) * 0.5)
        D, bias = torch.randn(K, E, device=device), torch.randn(K, E, device=device) * 0.3
        grid_orders = models.scan_orders(FOUR[:K], (14, 14), "middle", L, device=device)
        xs = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
        if label.startswith("bidirectional"):
            fn = lambda: kernels.bidirectional_scan(*xs)                                   # noqa: E731
        else:
            fn = lambda: kernels.multidirectional_scan(*xs, grid_orders)                   # noqa: E731
        grad = torch.randn(batch, E, L, device=device).to(torch.bfloat16)
        fwd = do_bench(fn)
        both = do_bench(lambda: torch.autograd.grad(fn(), xs, grad))
        rows.append((label, fwd, both))
    return rows


def check_kernel(device):
    """The compiled multidirectional Triton kernel against the reference on this GPU (fp32, random and per-sample
    orders, one run chunked): the worst relative error of the output and of each gradient. Raises when off."""
    import kernels
    from kernels.scan_multidir_triton import multidirectional_scan_triton
    g = torch.Generator(device=device).manual_seed(0)
    K, batch, E, L, N = 4, 2, 384, 197, 16

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, device=device, generator=g) * scale + shift

    xs = [r(K, batch, E, L), r(K, batch, E, L, scale=0.5, shift=-1.0), -torch.exp(r(K, E, N, scale=0.5)),
          r(K, batch, N, L), r(K, batch, N, L), r(K, E), r(batch, E, L), r(K, E, scale=0.3)]
    grad = r(batch, E, L)
    shared = torch.stack([torch.randperm(L, device=device, generator=g) for _ in range(K)])
    per_sample = torch.stack([torch.stack([torch.randperm(L, device=device, generator=g) for _ in range(batch)])
                              for _ in range(K)])
    worst = 0.0
    for orders, chunk in ((shared, None), (per_sample, 64)):
        results = []
        for fn in (lambda *a: kernels.multidirectional_scan(*a, backend="reference"),
                   lambda *a: multidirectional_scan_triton(*a, chunk_size=chunk)):
            leaves = [x.detach().clone().requires_grad_() for x in xs]
            out = fn(*leaves, orders)
            results.append([out.detach(), *torch.autograd.grad(out, leaves, grad)])
        for ref, got in zip(*results):
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    print(f"multidirectional Triton kernel vs reference on this GPU (fp32, K=4, 2 x 384 x 197): worst relative "
          f"error over output and gradients {worst:.1e}\n")
    if worst > 1e-3:
        raise RuntimeError("the compiled multidirectional kernel disagrees with the reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--params", action="store_true", help="print the parameter counts and stop (no GPU needed)")
    args = parser.parse_args()
    if args.params:
        print_params()
        return
    import triton
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"timm {timm.__version__}; Vim-T at 224, 1000 classes, bf16 autocast, fused AdamW, medians of "
          f"{args.steps} steps after {args.warmup}\n")
    check_kernel(device)
    print("| variant | batch | train step ms | train images/s | inference ms | inference images/s | peak GiB (train) |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        for label, kwargs in SPEED_VARIANTS:
            train_ms, infer_ms, peak = bench_model(kwargs, batch, args.steps, args.warmup, device)
            print(f"| {label} | {batch} | {train_ms:.1f} | {batch / train_ms * 1e3:,.0f} | {infer_ms:.1f} | "
                  f"{batch / infer_ms * 1e3:,.0f} | {peak:.1f} |", flush=True)
            torch.cuda.empty_cache()
    print(f"\nScan kernels alone, batch {args.batch[0]} x E 384 x L 197, N 16, bf16 token-major, Triton backend:\n")
    print("| kernel (directions) | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for label, fwd, both in bench_kernels(args.batch[0], device):
        print(f"| {label} | {fwd:.2f} | {both:.2f} |", flush=True)


if __name__ == "__main__":
    main()
