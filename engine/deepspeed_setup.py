"""The one DeepSpeed engine setup shared by pretraining and fine-tuning."""
import json
from pathlib import Path

import deepspeed
import torch

from .config import CONFIG_ROOT, ConfigError


def load_deepspeed_config(path, micro_batch, grad_accum, clip_grad):
    """Read a DeepSpeed json and set the batch, accumulation and clipping keys from our config.

    Mixed precision is torch.autocast in our loop, not DeepSpeed's bf16/fp16 modes: those cast every
    parameter to low precision, A_log, D and the dt bias included, which the scan needs in fp32.
    """
    candidates = [Path(path), CONFIG_ROOT.parent / path, CONFIG_ROOT / path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"deepspeed config not found: {path}")
    ds = json.loads(found.read_text())
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled"):
            raise ConfigError(f"{found}: {key}.enabled would cast the SSM parameters to low precision; "
                              "use train.precision instead (autocast with fp32 parameters)")
    ds.pop("train_batch_size", None)
    # ZeRO-0: backward_and_step clips, with torch's foreach norm; DeepSpeed would launch one norm per parameter
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              gradient_clipping=clip_grad if zero_stage(ds) > 0 else 0.0, zero_allow_untested_optimizer=True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds_config):
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def initialize_engine(module, optimizer, ds_config):
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one rank has nothing to average, but DeepSpeed would still copy every gradient through flat buffers
        engine.enable_backward_allreduce = False
    return engine, optimizer


def backward_and_step(engine, loss, clip_grad):
    """engine.backward + engine.step; under ZeRO-0 the gradients are clipped here (load_deepspeed_config)."""
    engine.backward(loss)
    if clip_grad > 0 and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        torch.nn.utils.clip_grad_norm_(engine.module.parameters(), clip_grad, foreach=True)
    engine.step()


def gathered_parameters(module):
    """Context in which ZeRO-3 partitioned parameters are whole on every rank (a no-op for stages 0-2)."""
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
