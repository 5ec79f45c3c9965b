"""Memory and time of a Vim-T training step on the reference (pure PyTorch) scan path, on the CPU.

    python bench/bench_reference_memory.py [--size 224] [--batch 1]

Prints the bytes autograd keeps for the backward (distinct storages seen by a saved-tensor hook), the process's peak
resident memory and the forward + backward seconds. One setting a process: peak RSS only grows.
"""
import argparse
import os
import resource
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402,F401  (registers the Vim models)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    model = timm.create_model("vim_tiny_patch16_224", img_size=a.size, num_classes=1000)
    images = torch.randn(a.batch, 3, a.size, a.size)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images).logsumexp(-1).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    print(f"Vim-T {a.size}px batch {a.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: saved for backward {sum(kept.values()) / 2**20:,.0f} MiB, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB, fwd+bwd {seconds:.1f} s")


if __name__ == "__main__":
    main()
