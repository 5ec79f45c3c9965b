"""Where a Vim training step spends its time: torch.profiler over a few steps on one GPU.

    python -m bench.profile_step [--model vim_tiny_patch16_224] [--size 224] [--batch 128] [--top 25] [--compile]

Prints the step's wall time, the GPU-busy time (sum of kernel times), the kernel launches per step, and the
operators that cost most GPU time (bf16 autocast, fused AdamW; random inputs). --compile: the model through
torch.compile (compiled during the warm-up steps), as `train.compile` runs it.
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import models  # noqa: F401


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim_tiny_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=None, help="patch size and stride override (e.g. 4 at 32 px)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--infer", action="store_true", help="profile inference instead of a training step")
    parser.add_argument("--compile", action="store_true", help="the model through torch.compile")
    args = parser.parse_args()
    kwargs = {"img_size": args.size}
    if args.patch:
        kwargs.update(patch_size=args.patch, stride=args.patch)
    model = timm.create_model(args.model, num_classes=1000, **kwargs).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if args.compile:
        model = torch.compile(model)
    images = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
    labels = torch.randint(0, 1000, (args.batch,), device="cuda")

    def step():
        if args.infer:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(images)
            return
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3 / args.steps
    print(f"{args.model}{' compiled' if args.compile else ''} size {args.size} batch {args.batch} "
          f"{'inference' if args.infer else 'train step'}: "
          f"wall {wall_ms:.1f} ms/step (with profiler), GPU busy {busy_ms:.1f} ms/step, "
          f"{len(kernels) / args.steps:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
