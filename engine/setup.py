"""What both entry points do before training: parse the command line, join the process group, seed,
turn the data section of the config into loaders, and take a pretrained encoder's variant from its export."""
import argparse
from pathlib import Path

import data
from .checkpoint import read_export_config
from .config import load_config
from .distributed import init_distributed, seed_everything


def parse_args(argv, description, default_config, add_arguments=None):
    """Flags, then `key.sub=value` overrides. Accepts the --local_rank the deepspeed launcher appends.

    default_config(args) names the config used when --config is not given.
    Returns (args, cfg, dist).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="a YAML file (default: the demo config)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config or default_config(args), args.overrides)
    dist = init_distributed(args.local_rank)
    # each rank gets its own stream for dropout and masking; data order is seeded separately
    seed_everything(cfg.seed + dist.rank)
    return args, cfg, dist


def resolve_shards(cfg):
    """(train urls, eval urls, train samples, eval samples) from the config, or the embedded data set."""
    dc = cfg.data
    if dc.train_shards:
        return dc.train_shards, dc.eval_shards or None, dc.train_samples or None, dc.eval_samples or None
    default = data.default_dataset(dc.cache_dir or None)
    return default["train"], dc.eval_shards or default["eval"], default["train_samples"], default["eval_samples"]


def num_classes(cfg, urls):
    """data.num_classes, else the number of class names stored beside the shards."""
    if cfg.data.num_classes > 0:
        return cfg.data.num_classes
    info = data.read_info(urls) or {}
    classes = info.get("classes")
    if not classes:
        raise ValueError(f"no class names found beside {urls}: set data.num_classes")
    return len(classes)


def build_data(cfg, dist, fields, train_transform, eval_transform=None, text_transform=None, eval_fields=None):
    """Train loader (shuffled, split over ranks and workers) and eval loader (or None) as data.DataInfo."""
    train_urls, eval_urls, train_n, eval_n = resolve_shards(cfg)
    # no pinning under train.cuda_graph: the pinning thread's CUDA event queries, made while the main thread
    # captures the graph, invalidate the capture (seen on an H100 with DeiT-T)
    common = dict(num_workers=cfg.data.num_workers, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                  text_transform=text_transform, pin_memory=dist.device.type == "cuda" and not cfg.train.cuda_graph)
    train = data.build_loader(train_urls, fields=fields, batch_size=cfg.data.batch_size, transform=train_transform,
                              is_training=True, num_samples=train_n, resampled=cfg.data.resampled,
                              shuffle_buffer=cfg.data.shuffle_buffer, repeated_aug=cfg.data.repeated_aug, **common)
    evaluation = None
    if eval_urls and eval_transform is not None:
        evaluation = data.build_loader(eval_urls, fields=eval_fields or fields, transform=eval_transform,
                                       batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
                                       is_training=False, num_samples=eval_n, **common)
    return train, evaluation


def model_config(cfg, **overrides):
    """{"name", "kwargs"}: what rebuilds the model with timm.create_model, stored with every export."""
    return {"name": cfg.model.name, "kwargs": {**cfg.model.kwargs(), **overrides}}


# VisionMamba's design-space kwargs and their defaults: the variant an export without them was trained as
DESIGN_DEFAULTS = {"cls_mode": "middle", "bidir_mode": "v2", "scan_orders": ["row", "row_reverse"]}


def adopt_export_design(cfg, path, is_main=True):
    """Build the model as the variant the encoder at `path` was trained as, from the json its export wrote beside it.

    Some variants have identical parameter shapes (a middle or a head class token; bidir_mode none, sequence or
    block), so loading into the wrong one would go unnoticed. A design-space key (DESIGN_DEFAULTS) the config leaves
    unset is taken from the export; one it sets to another value stops the run. Files without the json (public
    Vim checkpoints) are the default variant and are left to the config.
    """
    exported = read_export_config(path) if path else None
    if exported is None:
        return
    meta = Path(path).with_suffix(".json")
    saved = exported.get("kwargs", {})
    for key, default in DESIGN_DEFAULTS.items():
        theirs, mine = saved.get(key), getattr(cfg.model, key)
        if mine is None:
            setattr(cfg.model, key, theirs)
            if is_main and theirs is not None:
                print(f"model.{key}={theirs} (from {meta})", flush=True)
        elif mine != (default if theirs is None else theirs):
            raise ValueError(f"model.{key}={mine} but the encoder {path} was trained with "
                             f"{key}={default if theirs is None else theirs} ({meta}); drop the override")
