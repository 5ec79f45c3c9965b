"""Training-step throughput of the pretraining objectives on one GPU (synthetic inputs: the model alone, not the
data loader): forward + backward + AdamW step under bf16 autocast, CUDA-event medians.

    python -m bench.bench_pretrain [--models vim_tiny_patch16_224 vim_small_patch16_224] [--batch 128]
"""
import argparse

import timm
import torch

import models  # noqa: F401
from bench.timing import cuda_median_ms
from pretrain.clip import ClipModel, build_text_tower
from pretrain.mae import MaskedAutoencoder


def build(objective, name, batch, device, rank=0, world_size=1):
    """(module, batch_fn): the recipe's MAE (decoder 512 x 8) or CLIP (512-d text tower) around a fresh encoder."""
    encoder = timm.create_model(name, num_classes=0)
    if objective == "mae":
        module = MaskedAutoencoder(encoder, {}, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
        batch_fn = lambda: {"image": torch.randn(batch, 3, 224, 224, device=device)}
    else:
        module = ClipModel(encoder, build_text_tower(512), 512, {}, rank=rank, world_size=world_size)
        batch_fn = lambda: {"image": torch.randn(batch, 3, 224, 224, device=device),
                            "text": torch.randint(1, 49000, (batch, 77), device=device)}
    return module.to(device), batch_fn


def time_steps(module, batch_fn, steps, warmup):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    batch = batch_fn()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = module(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cuda_median_ms(step, steps, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224", "vim_small_patch16_224"])
    parser.add_argument("--objectives", nargs="+", default=["mae", "clip"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default=None, help="scan backend (default: the best available)")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}")
    print("| objective | model | batch | step ms (median) | images/s | peak GiB |\n|---|---|---|---|---|---|")
    for objective in args.objectives:
        for name in args.models:
            torch.cuda.reset_peak_memory_stats()
            module, batch_fn = build(objective, name, args.batch, device)
            if args.backend:
                for m in module.modules():
                    if hasattr(m, "scan_backend"):
                        m.scan_backend = args.backend
            ms = time_steps(module, batch_fn, args.steps, args.warmup)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"| {objective} | {name} | {args.batch} | {ms:.1f} | {args.batch / ms * 1e3:,.0f} | {peak:.1f} |", flush=True)
            del module


if __name__ == "__main__":
    main()
