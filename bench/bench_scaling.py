"""Data-parallel scaling of pretraining under DeepSpeed: images/s and GPU memory per rank, per ZeRO stage.

    deepspeed --num_gpus N bench/bench_scaling.py [--objectives mae clip] [--model vim_small_patch16_224]
        [--stages 1 2 3] [--batch 128] [--out scaling.jsonl]

Each rank trains on synthetic batches (the model, DeepSpeed and its collectives, not the data loader) with the
step of engine.train: bf16 autocast, the loss synced to the host, one all-reduce of the step flags,
engine.backward + engine.step, AdamW from engine.optim with the recipe's parameter groups. The MAE and CLIP
modules are built as bench/bench_pretrain.py builds them (the recipes' decoder and text tower), CLIP with its
loss gathered over ranks. Rank 0 prints one markdown row per (objective, stage) and appends it to --out.
Memory is torch.cuda.max_memory_allocated, the maximum over ranks.
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_pretrain import build  # noqa: E402
from engine.config import OptimConfig  # noqa: E402
from engine.deepspeed_setup import initialize_engine, load_deepspeed_config  # noqa: E402
from engine.distributed import all_reduce_sum, init_distributed  # noqa: E402
from engine.optim import build_optimizer, build_param_groups  # noqa: E402


def run(objective, stage, args, dist):
    module, batch_fn = build(objective, args.model, args.batch, dist.device, rank=dist.rank,
                             world_size=dist.world_size)
    optim_cfg = OptimConfig()
    optimizer = build_optimizer(optim_cfg, build_param_groups(module, optim_cfg.weight_decay), 1e-4, dist.device)
    ds_config = load_deepspeed_config(f"configs/deepspeed/zero{stage}.json", args.batch, 1, 1.0)
    engine, optimizer = initialize_engine(module, optimizer, ds_config)
    batch = batch_fn()
    on_gpu = dist.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step():
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss, _ = engine(batch)
        loss.item()
        all_reduce_sum([0.0, 0.0], dist.device)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    sync()
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    torch.distributed.barrier()
    elapsed = time.perf_counter() - start
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0, device=dist.device)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    engine.destroy()
    return {"objective": objective, "model": args.model, "zero": stage, "gpus": dist.world_size,
            "batch_per_gpu": args.batch, "images_per_s": args.steps * args.batch * dist.world_size / elapsed,
            "step_ms": elapsed / args.steps * 1e3, "peak_gib_per_rank": peak.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["mae", "clip"], choices=["mae", "clip"])
    parser.add_argument("--model", default="vim_small_patch16_224")
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=128, help="per GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None, help="append the rows as JSON lines here")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parents[1])
    dist = init_distributed(args.local_rank)
    torch.manual_seed(dist.rank)
    for objective in args.objectives:
        for stage in args.stages:
            row = run(objective, stage, args, dist)
            gc.collect()  # the engine, module and batch of that run go before the next is built
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if dist.is_main:
                print(f"| {objective} | {args.model} | {stage} | {dist.world_size} | {args.batch} | "
                      f"{row['images_per_s']:,.0f} | {row['step_ms']:.1f} | {row['peak_gib_per_rank']:.1f} |", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
