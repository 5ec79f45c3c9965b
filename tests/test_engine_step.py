"""The engine's DeepSpeed step on one CPU rank: ZeRO-0 clips in backward_and_step (torch's foreach norm) and skips
the one-rank all-reduce, so it dispatches no more ops than a plain PyTorch step, and updates the parameters as
DeepSpeed's own clipping (ZeRO-1) does."""
import copy

import pytest
import timm
import torch

import models  # noqa: F401
from bench.bench_engine_overhead import Classifier as Task
from bench.bench_engine_overhead import OpCounter
from engine.config import OptimConfig
from engine.deepspeed_setup import backward_and_step, initialize_engine, load_deepspeed_config
from engine.distributed import init_distributed
from engine.optim import build_optimizer, build_param_groups


@pytest.fixture(scope="module")
def setup():
    init_distributed()
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=8, patch_size=4, stride=4, embed_dim=16, depth=3,
                              num_classes=4)
    batch = (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    return model, batch


def make_engine(model, stage, clip):
    task = Task(copy.deepcopy(model))
    cfg = OptimConfig()
    optimizer = build_optimizer(cfg, build_param_groups(task, cfg.weight_decay, 1.0), 1e-2, torch.device("cpu"))
    engine, _ = initialize_engine(task, optimizer, load_deepspeed_config(f"configs/deepspeed/zero{stage}.json", 4, 1,
                                                                         clip))
    return engine


def test_zero0_clips_like_deepspeed_zero1(setup):
    model, batch = setup
    params = {}
    for stage in (0, 1):
        engine = make_engine(model, stage, clip=0.05)   # small enough that every step is clipped
        for _ in range(3):
            backward_and_step(engine, engine(batch), 0.05)
        params[stage] = [p.detach().clone() for p in engine.module.parameters()]
        engine.destroy()
    moved = max((p - q).abs().max().item() for p, q in zip(params[0], model.parameters()))
    assert moved > 1e-3
    for p0, p1 in zip(params[0], params[1]):
        torch.testing.assert_close(p0, p1, rtol=1e-5, atol=1e-6)


def test_zero0_step_dispatches_what_a_plain_step_does(setup):
    model, batch = setup
    task = Task(copy.deepcopy(model))
    optimizer = build_optimizer(OptimConfig(), build_param_groups(task, 0.05, 1.0), 1e-3, torch.device("cpu"))

    def plain():
        task(batch).backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    engine = make_engine(model, 0, clip=1.0)
    counts = []
    for step in (plain, lambda: backward_and_step(engine, engine(batch), 1.0)):
        step()
        with OpCounter() as counter:
            step()
        counts.append(sum(counter.counts.values()))
    engine.destroy()
    # DeepSpeed's own ZeRO-0 path added ~4 ops per parameter (flat-buffer copies, one norm each): 100s here
    assert counts[1] <= counts[0] + 10, counts
