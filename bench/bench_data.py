"""Data loading throughput on CPU: images/s (total and per worker) of build_loader over the shared shards.

    python -m bench.bench_data [--shared ../shared/data] [--workers 1 2] [--images 4000]

Cases: CIFAR-10 (32 px JPEG shards, .tar.gz) and the ImageNet sample (short side 224, .tar.gz), each with
the pretraining transform (RandomResizedCrop scale (0.2, 1) + flip) and the fine-tuning transform (+
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25). The first batch is not timed (worker start and
shuffle-buffer fill). Prints a markdown table and the machine it ran on.
"""
import argparse
import platform
import time
from pathlib import Path

import PIL
import timm
import torch

from data import build_loader, build_transform

AUGMENT = {"pretrain": {"scale": (0.2, 1.0)},
           "finetune": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}}
DATASETS = {  # name: (shard pattern under --shared, input size, samples in those shards, batch size)
    "cifar10": ("cifar10/cifar10-train-{000000..000009}.tar.gz", 32, 50000, 256),
    "imagenet-sample": ("imagenet-sample/imagenet-sample-000000.tar.gz", 224, 1000, 32),
}


def images_per_second(urls: str, size: int, num_samples: int, batch_size: int, workers: int, augment: dict,
                      max_images: int) -> float:
    info = build_loader(urls, fields=("image", "label"), batch_size=batch_size, num_workers=workers,
                        num_samples=num_samples, transform=build_transform(True, size, **augment), pin_memory=False)
    info.set_epoch(0)
    it = iter(info.loader)
    next(it)  # warm-up: workers start, shuffle buffers fill
    images, start = 0, time.perf_counter()
    for batch in it:
        images += batch["image"].shape[0]
        if images >= max_images:
            break
    return images / (time.perf_counter() - start)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{torch.get_num_threads()} threads / {len(__import__('os').sched_getaffinity(0))} cores, {cpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
            f"Pillow {PIL.__version__}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[1] / "../shared/data"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=4000, help="images timed per case (at most one epoch)")
    args = p.parse_args(argv)

    print("| data | input | transform | workers | images/s | images/s per worker |")
    print("|---|---|---|---|---|---|")
    for name, (pattern, size, num_samples, batch_size) in DATASETS.items():
        urls = str(Path(args.shared) / pattern)
        for augment_name, augment in AUGMENT.items():
            for workers in args.workers:
                rate = images_per_second(urls, size, num_samples, batch_size, workers, augment, args.images)
                print(f"| {name} | {size} px | {augment_name} | {workers} | {rate:.0f} | {rate / workers:.0f} |",
                      flush=True)
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    main()
