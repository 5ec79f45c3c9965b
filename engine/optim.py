"""Optimizer and learning-rate schedule, both from timm."""
import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


def build_param_groups(module, weight_decay, layer_decay=1.0):
    """Trainable parameters in groups: no weight decay on 1-D params, biases and module.no_weight_decay();
    with layer_decay < 1, an lr_scale per layer from module.group_matcher (timm's layer-wise decay)."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else set()
    if layer_decay < 1.0:
        return param_groups_layer_decay(module, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)


def build_optimizer(optim_cfg, param_groups, lr, device):
    """AdamW (fused on CUDA), LARS (linear probing) or SGD, at peak lr."""
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                 fused=device.type == "cuda")
    if optim_cfg.name == "lars":
        return Lars(param_groups, lr=lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=optim_cfg.momentum)
    raise ValueError(f"optim.name must be adamw, lars or sgd, got {optim_cfg.name!r}")


def peak_lr(optim_cfg, global_batch):
    """optim.lr if set, else the linear scaling rule blr * global batch / lr_base_batch."""
    return optim_cfg.lr if optim_cfg.lr > 0 else optim_cfg.blr * global_batch / optim_cfg.lr_base_batch


def build_scheduler(optimizer, optim_cfg, total_steps, steps_per_epoch):
    """Per-iteration linear warmup then cosine to min_lr; call .step_update(step) every optimizer step.

    Each group's lr_scale (layer decay) is applied by timm."""
    warmup = optim_cfg.warmup_steps or int(round(optim_cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        optimizer, t_initial=max(total_steps - warmup, 1), lr_min=optim_cfg.min_lr, warmup_t=warmup,
        warmup_lr_init=optim_cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )
