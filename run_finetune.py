"""Fine-tuning, linear probing and supervised training of Vim encoders under DeepSpeed.

    deepspeed run_finetune.py --task imagenet --config configs/finetune/finetune_mae_vim_tiny.yaml --pretrained ENC
    python run_finetune.py --task classification               # the demo: embedded data, from scratch
    python run_finetune.py --task linprobe --pretrained outputs/mae_demo/encoder.safetensors
    python run_finetune.py --task imagenet --eval-only --pretrained vim_t_midclstok_76p1acc.pth [overrides]

--pretrained takes one of our exports (MAE, CLIP, fine-tuned) or a public Vim checkpoint; without it the
model trains from scratch (the supervised baseline).
"""
import json
import sys
from pathlib import Path

import timm
import torch

import data
import models
from engine.distributed import all_gather_object, shutdown_distributed
from engine.setup import adopt_export_design, build_data, model_config, num_classes, parse_args, resolve_shards
from engine.train import autocast_dtype, evaluate, train

DEMO_CONFIGS = {
    "imagenet": "configs/finetune/supervised_vim_tiny.yaml",
    "classification": "configs/finetune/classification_demo.yaml",
    "linprobe": "configs/finetune/linprobe_demo.yaml",
}


def load_pretrained(model, path, is_main):
    """Load an encoder into `model`; the head is kept only when the checkpoint's fits the model's."""
    state = models.read_state_dict(path)
    head = state.get("head.weight")
    keep_head = head is not None and hasattr(model.head, "weight") and head.shape == model.head.weight.shape
    models.load_checkpoint(model, path, strict=True, drop_head=not keep_head)
    if is_main:
        print(f"loaded {path}" + ("" if keep_head else " (head initialised anew)"), flush=True)
    return keep_head


def build_task(args, cfg, dist):
    aug = cfg.augment
    train_urls, _, _, _ = resolve_shards(cfg)
    classes = num_classes(cfg, train_urls)
    if args.task == "imagenet" and classes != 1000:
        raise ValueError(f"--task imagenet needs 1000 classes, the data has {classes}: use --task classification")
    eval_tf = data.build_transform(False, cfg.data.input_size, crop_pct=aug.crop_pct, interpolation=aug.interpolation)
    pretrained = args.pretrained or cfg.finetune.pretrained
    adopt_export_design(cfg, pretrained, dist.is_main)
    from finetune import Classifier, LinearProbe, extract_features

    if args.task == "linprobe":
        train_tf = data.build_transform(True, cfg.data.input_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip,
                                        interpolation=aug.interpolation)
        encoder = timm.create_model(cfg.model.name, **{**cfg.model.kwargs(), "num_classes": 0})
        if pretrained:
            load_pretrained(encoder, pretrained, dist.is_main)
        module = LinearProbe(encoder, classes, model_config(cfg, num_classes=0))
        if cfg.finetune.cache_features:
            # features of un-augmented images, extracted once (each rank its share, then shared by all);
            # the head then trains on them in memory
            train_data, eval_data = build_data(cfg, dist, ("image", "label"), eval_tf, eval_tf)
            module.to(dist.device)
            dtype = autocast_dtype(cfg.train.precision, dist.device)
            cached = []
            for split in (train_data, eval_data):
                parts = all_gather_object(extract_features(encoder, _one_pass(split), dist.device, dtype))
                cached.append(data.FeatureData(
                    torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]), cfg.data.batch_size,
                    seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, is_training=split is train_data))
            return module, cached[0], cached[1]
    else:
        train_tf = data.build_transform(True, cfg.data.input_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip,
                                        auto_augment=aug.auto_augment or None, re_prob=aug.re_prob,
                                        color_jitter=aug.color_jitter or None, interpolation=aug.interpolation)
        head = cfg.model.num_classes if cfg.model.num_classes is not None else classes
        if head != classes:
            raise ValueError(f"model.num_classes={head}: the head has {head} outputs but the data has {classes} classes")
        model = timm.create_model(cfg.model.name, **{**cfg.model.kwargs(), "num_classes": classes})
        if pretrained:
            keep_head = load_pretrained(model, pretrained, dist.is_main)
            if not keep_head:
                model.reset_classifier(classes)
                timm.layers.trunc_normal_(model.head.weight, std=cfg.finetune.head_init_std)
        model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        module = Classifier(model, classes, model_config(cfg, num_classes=classes), mixup=aug.mixup, cutmix=aug.cutmix,
                            smoothing=aug.smoothing, ema_decay=cfg.finetune.ema_decay if cfg.finetune.ema else None)
    train_data, eval_data = build_data(cfg, dist, ("image", "label"), train_tf, eval_tf)
    return module, train_data, eval_data


def _one_pass(info):
    info.set_epoch(0)
    return info.loader


def main(argv=None):
    def add_arguments(parser):
        parser.add_argument("--task", choices=sorted(DEMO_CONFIGS), default="classification")
        parser.add_argument("--pretrained", default="", help="encoder weights to start from (or to evaluate)")
        parser.add_argument("--eval-only", action="store_true", help="evaluate --pretrained and stop")

    args, cfg, dist = parse_args(argv, __doc__, lambda a: DEMO_CONFIGS[a.task], add_arguments)
    module, train_data, eval_data = build_task(args, cfg, dist)
    if args.eval_only:
        return evaluate_only(cfg, module, eval_data, dist)
    return train(cfg, module, train_data, dist, eval_data=eval_data)


def evaluate_only(cfg, module, eval_data, dist):
    """Top-1/top-5 of the loaded weights on the eval shards, written to output_dir/results.json."""
    if eval_data is None:
        raise ValueError("--eval-only needs eval data: set data.eval_shards")
    results = evaluate(module.to(dist.device), eval_data, dist, cfg.train.precision)
    if dist.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
