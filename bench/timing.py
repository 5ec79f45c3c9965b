"""CUDA-event timing shared by the GPU benchmarks."""
import statistics

import torch


def cuda_median_ms(fn, steps, warmup, budget_ms=None):
    """Median milliseconds of fn() between CUDA events, after `warmup` untimed calls; with budget_ms, stops early
    once that much timed work is done."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < steps and (budget_ms is None or sum(times) < budget_ms):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
