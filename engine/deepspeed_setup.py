"""The one DeepSpeed engine setup shared by pretraining and fine-tuning."""
import json
from pathlib import Path

import deepspeed

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
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              gradient_clipping=clip_grad, zero_allow_untested_optimizer=True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def initialize_engine(module, optimizer, ds_config):
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def gathered_parameters(module):
    """Context in which ZeRO-3 partitioned parameters are whole on every rank (a no-op for stages 0-2)."""
    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
