"""What the DeepSpeed engine adds to a training step: dispatched tensor ops and step time, plain PyTorch against
DeepSpeed per ZeRO stage and gradient clipping, on one process.

    python bench/bench_engine_overhead.py [--device cpu|cuda] [--embed-dim 16] [--img-size 8] [--batch 2]

The model keeps Vim-T's 24 blocks (so the parameter count per tensor list, which the engine's per-parameter work
scales with, is Vim-T's) but may be made narrow and tiny in tokens, so that what is measured is the per-step
overhead rather than the arithmetic. Ops are counted with a TorchDispatchMode (every aten call, views included;
on a GPU each non-view op is about one kernel launch). Step time: median wall time of 15 steps after 3, with the
device synchronised. The plain step is our optimizer (engine.optim) with torch's foreach clipping where clipping
is on; the engine step is engine.deepspeed_setup's (backward_and_step: DeepSpeed clips under ZeRO-1/2, the step
itself under ZeRO-0). --layer-decay 0.8 builds fine-tuning's parameter groups (one per layer) instead of the two of
pretraining.
"""
import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402,F401
from engine.config import OptimConfig  # noqa: E402
from engine.deepspeed_setup import backward_and_step, initialize_engine, load_deepspeed_config  # noqa: E402
from engine.optim import build_optimizer, build_param_groups  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Classifier(torch.nn.Module):
    """The engine's module contract: forward(batch) -> loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return F.cross_entropy(self.model(batch[0]), batch[1])


def measure(step, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    with OpCounter() as counter:
        step()
    times = []
    for _ in range(15):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return counter.counts, statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layer-decay", type=float, default=1.0, help="< 1: a parameter group per layer (fine-tuning)")
    args = parser.parse_args()
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29541").items():
        os.environ.setdefault(key, value)
    device = torch.device(args.device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    kwargs = dict(img_size=args.img_size, patch_size=4, stride=4, num_classes=10, embed_dim=args.embed_dim)
    batch = (torch.randn(args.batch, 3, args.img_size, args.img_size, device=device),
             torch.randint(0, 10, (args.batch,), device=device))
    cfg = OptimConfig()

    def fresh():
        model = timm.create_model("vim_tiny_patch16_224", **kwargs).to(device)
        groups = build_param_groups(model, cfg.weight_decay, args.layer_decay)
        return Classifier(model), build_optimizer(cfg, groups, 1e-4, device)

    print(f"Vim-T depth, embed_dim {args.embed_dim}, {args.img_size} px, batch {args.batch}, {device}, "
          f"{len(fresh()[1].param_groups)} parameter groups, torch {torch.__version__}")
    print("| step | ops dispatched | vs plain | most added (op: count) | step ms |\n|---|---|---|---|---|")
    plain_counts = None
    for clip in (0.0, 1.0):
        module, optimizer = fresh()

        def plain_step():
            module(batch).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        counts, ms = measure(plain_step, device)
        plain_counts = plain_counts or counts
        total = sum(counts.values())
        print(f"| plain, clip {clip} | {total:,} | {total - sum(plain_counts.values()):+,} | - | {ms:.1f} |")
    for stage in (0, 1, 2):
        for clip in (0.0, 1.0):
            module, optimizer = fresh()
            engine, _ = initialize_engine(module, optimizer,
                                          load_deepspeed_config(f"configs/deepspeed/zero{stage}.json", args.batch, 1, clip))

            def engine_step():
                backward_and_step(engine, engine(batch), clip)

            counts, ms = measure(engine_step, device)
            engine.destroy()
            added = ", ".join(f"{k.removeprefix('aten.')}: {v}" for k, v in (counts - plain_counts).most_common(5))
            total = sum(counts.values())
            print(f"| DeepSpeed ZeRO-{stage}, clip {clip} | {total:,} | {total - sum(plain_counts.values()):+,} | "
                  f"{added} | {ms:.1f} |", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
