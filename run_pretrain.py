"""Self-supervised pretraining of a Vim encoder under DeepSpeed.

    deepspeed run_pretrain.py --objective mae [--config FILE] [key.sub=value ...]
    python run_pretrain.py --objective clip                # one process, CPU or one GPU

With no --config, the objective's demo config runs on the embedded default data set.
"""
import sys

import timm
import torch

import data
import models  # also registers the Vim models in timm
from engine.distributed import shutdown_distributed
from engine.setup import adopt_export_design, build_data, model_config, parse_args
from engine.train import train

DEMO_CONFIGS = {"mae": "configs/pretrain/mae_demo.yaml", "clip": "configs/pretrain/clip_demo.yaml"}


def first_images(info, n):
    """The first n images of a loader (eval transform), for the reconstruction grid."""
    info.set_epoch(0)
    images = []
    for batch in info.loader:
        images.append(batch["image"])
        if sum(len(b) for b in images) >= n:
            break
    return torch.cat(images)[:n]


def build_mae(cfg, dist):
    aug = cfg.augment
    train_tf = data.build_transform(True, cfg.data.input_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip,
                                    interpolation=aug.interpolation)
    eval_tf = data.build_transform(False, cfg.data.input_size, crop_pct=aug.crop_pct, interpolation=aug.interpolation)
    train_data, eval_data = build_data(cfg, dist, ("image",), train_tf, eval_tf)
    encoder = timm.create_model(cfg.model.name, **{**cfg.model.kwargs(), "num_classes": 0})
    encoder.set_grad_checkpointing(cfg.train.grad_checkpointing)
    from pretrain.mae import MaskedAutoencoder
    mc = cfg.mae
    module = MaskedAutoencoder(
        encoder, model_config(cfg, num_classes=0), mask_ratio=mc.mask_ratio, mask_mode=mc.mask_mode,
        mask_block=mc.mask_block, decoder=mc.decoder, decoder_embed_dim=mc.decoder_embed_dim,
        decoder_depth=mc.decoder_depth, decoder_num_heads=mc.decoder_num_heads, norm_pix_loss=mc.norm_pix_loss,
        vis_images=first_images(eval_data, mc.num_vis) if eval_data is not None and mc.num_vis > 0 else None,
    )
    # MAE reports no eval metric: the eval split only feeds the reconstruction grid
    return module, train_data, None


def build_clip(cfg, dist):
    from pretrain.clip import ClipModel, Tokenizer, build_text_tower, zeroshot_templates
    aug, cc = cfg.augment, cfg.clip
    tokenizer = Tokenizer(cc.context_length)
    train_tf = data.build_transform(True, cfg.data.input_size, scale=(aug.scale_min, 1.0), hflip=aug.hflip,
                                    interpolation=aug.interpolation)
    eval_tf = data.build_transform(False, cfg.data.input_size, crop_pct=aug.crop_pct, interpolation=aug.interpolation)
    train_data, eval_data = build_data(cfg, dist, ("image", "text"), train_tf, eval_tf, text_transform=tokenizer,
                                       eval_fields=("image", "label"))
    adopt_export_design(cfg, cc.init_image_from, dist.is_main)
    encoder = timm.create_model(cfg.model.name, **{**cfg.model.kwargs(), "num_classes": 0})
    if cc.init_image_from:
        models.load_checkpoint(encoder, cc.init_image_from, strict=True, drop_head=True)
    encoder.set_grad_checkpointing(cfg.train.grad_checkpointing)
    text = build_text_tower(cc.embed_dim, cc.text_model, cc.context_length, cc.vocab_size, cc.text_width,
                            cc.text_heads, cc.text_layers)
    classnames = eval_data.classes if eval_data is not None else None
    module = ClipModel(encoder, text, cc.embed_dim, model_config(cfg, num_classes=0), rank=dist.rank,
                       world_size=dist.world_size, init_logit_scale=cc.init_logit_scale,
                       max_logit_scale=cc.max_logit_scale, classnames=classnames,
                       templates=zeroshot_templates(cc.zeroshot_templates), tokenizer=tokenizer)
    return module, train_data, eval_data


def main(argv=None):
    def add_arguments(parser):
        parser.add_argument("--objective", choices=sorted(DEMO_CONFIGS), default="mae")

    args, cfg, dist = parse_args(argv, __doc__, lambda a: DEMO_CONFIGS[a.objective], add_arguments)
    builder = {"mae": build_mae, "clip": build_clip}[args.objective]
    module, train_data, eval_data = builder(cfg, dist)
    return train(cfg, module, train_data, dist, eval_data=eval_data)


if __name__ == "__main__":
    main(sys.argv[1:])
    shutdown_distributed()
