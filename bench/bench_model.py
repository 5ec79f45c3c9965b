"""Vim against DeiT end to end on one GPU: inference and training-step images/s and peak memory, side by side.

    python -m bench.bench_model [--pairs tiny small base] [--sizes 224 512 1024 1248 2048] [--compile]
    python -m bench.bench_model --pairs tiny --sizes 32 --patch-size 4     # the CIFAR-10 experiments' model

Random weights and inputs, bf16 autocast with fp32 parameters (our training setup); DeiT is timm's with
PyTorch's fused attention (scaled_dot_product_attention). Inference: forward under inference_mode. Training
step: forward, cross-entropy on random labels, backward, fused AdamW step. CUDA-event medians after warm-up.
Peak memory is torch.cuda.max_memory_allocated over the timed steps minus the memory held before the step
(parameters and optimizer state), i.e. the activations and workspaces a batch needs. --cuda-graph captures the
whole step once (for training: forward, backward and the capturable fused AdamW step, PyTorch's whole-network
capture) and times its replays: what is left when no op is launched from the host. --compile runs both models
through torch.compile (default mode; Vim's Triton kernels are opaque custom ops in its graph) and prints, per
model, the compiled logits' distance from eager's and the seconds of the first compiled calls (the compiles).
"""
import argparse
import contextlib
import functools
import time

import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the Vim models)
from bench.timing import cuda_median_ms

PAIRS = {"tiny": ("vim_tiny_patch16_224", "deit_tiny_patch16_224"),
         "small": ("vim_small_patch16_224", "deit_small_patch16_224"),
         "base": ("vim_base_patch16_224", "deit_base_patch16_224")}
INFER_BATCH = {32: 256, 224: 64, 512: 64, 1024: 8, 1248: 8, 2048: 2}
TRAIN_BATCH = {32: 256, 224: 128, 512: 32, 1024: 8, 1248: 8, 2048: 2}


def measure(name, size, batch, train, args):
    """(images/s, activation peak MiB) of one model, or None when the batch does not fit."""
    torch.cuda.empty_cache()
    kwargs = {"img_size": size, "patch_size": args.patch_size}
    if name.startswith("vim"):
        kwargs["stride"] = args.patch_size
        if args.backend:
            kwargs["scan_backend"] = args.backend
    model = timm.create_model(name, num_classes=1000, **kwargs).cuda()
    if train and args.grad_ckpt and size >= args.grad_ckpt:
        model.set_grad_checkpointing(True)
    forward = torch.compile(model) if args.compile else model
    images = torch.randn(batch, 3, size, size, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=args.cuda_graph) if train else None

    # a graph must not replay casts cached by an autocast region that ended at capture (PyTorch's graph docs)
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, cache_enabled=not args.cuda_graph)

    def step():
        if train:
            with autocast():
                loss = F.cross_entropy(forward(images), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast():
                forward(images)

    try:
        if args.compile:
            _report_compiled(name, size, train, model, forward, images, autocast)
        first = time.perf_counter()
        step()  # creates the optimizer state before the baseline is read
        if args.compile and train:  # the backward's graph is compiled at the first backward
            torch.cuda.synchronize()
            print(f"  {name} {size} train: first step {time.perf_counter() - first:.1f} s", flush=True)
        if args.cuda_graph:
            step = _graphed(step)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_median_ms(step, args.steps, args.warmup, budget_ms=3000.0)
        # a replayed graph allocates nothing: its pool was taken at capture, before the counter was reset
        peak = None if args.cuda_graph else (torch.cuda.max_memory_allocated() - held) / 2**20
    except torch.cuda.OutOfMemoryError:
        return None
    return batch / ms * 1e3, peak


def _report_compiled(name, size, train, model, forward, images, autocast):
    """Prints how far the compiled model's logits are from eager's on the benchmark batch (same weights, same
    autocast) and in the step's grad mode, so the graph compiled here is the one timed (the models have no dropout
    or drop path on)."""
    with (contextlib.nullcontext() if train else torch.inference_mode()), autocast():
        eager = model(images).detach().float()
        start = time.perf_counter()
        compiled = forward(images).detach().float()
        seconds = time.perf_counter() - start
    diff = ((compiled - eager).abs().max() / eager.abs().max()).item()
    print(f"  {name} {size} {'train' if train else 'infer'}: first compiled forward {seconds:.1f} s, compiled vs "
          f"eager logits max |diff| / max |eager| {diff:.2e}", flush=True)


def _graphed(step):
    """step captured once in a CUDA graph (static input and output buffers) and replayed: no launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def cell(result):
    if result is None:
        return "OOM"
    return f"{result[0]:,.0f}" + ("" if result[1] is None else f" ({result[1]:,.0f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 512, 1024, 1248, 2048], choices=list(INFER_BATCH))
    parser.add_argument("--patch-size", type=int, default=16, help="both models' patch size (Vim's stride too)")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default=None, help="Vim scan backend (default: the best available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cuda-graph", action="store_true", help="steps replayed from a CUDA graph (both models)")
    parser.add_argument("--grad-ckpt", type=int, default=0, metavar="SIZE",
                        help="activation checkpointing for training at this resolution and above (0 = off)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"triton {__import__('triton').__version__}, compile={args.compile}, cuda_graph={args.cuda_graph}, "
          f"grad_ckpt>={args.grad_ckpt or 'off'}, patch {args.patch_size}")
    print("| mode | size | batch | model | Vim images/s (peak) | DeiT images/s (peak) | Vim / DeiT |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:
        batches = TRAIN_BATCH if mode == "train" else INFER_BATCH
        for size in args.sizes:
            for pair in args.pairs:
                vim, deit = (measure(name, size, batches[size], mode == "train", args) for name in PAIRS[pair])
                ratio = f"{vim[0] / deit[0]:.2f}x" if vim and deit else "-"
                print(f"| {mode} | {size} | {batches[size]} | {pair} | {cell(vim)} | {cell(deit)} | {ratio} |",
                      flush=True)


if __name__ == "__main__":
    main()
