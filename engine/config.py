"""Run configuration: YAML files -> typed dataclasses, with `key.sub=value` overrides.

A config file may start with `defaults: [other.yaml, ...]` (paths relative to the file, or to configs/),
merged first, later files and keys winning. Every key is checked against the dataclasses below: an
unknown key or a value of the wrong type is a ConfigError that names the key.
"""
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


@dataclass
class ModelConfig:
    """A timm model name and the constructor kwargs to override (None = the registered default)."""
    name: str = "vim_tiny_patch16_224"
    img_size: typing.Optional[int] = None
    patch_size: typing.Optional[int] = None
    stride: typing.Optional[int] = None
    in_chans: typing.Optional[int] = None
    embed_dim: typing.Optional[int] = None
    depth: typing.Optional[int] = None
    num_classes: typing.Optional[int] = None
    d_state: typing.Optional[int] = None
    drop_rate: typing.Optional[float] = None
    drop_path_rate: typing.Optional[float] = None
    scan_backend: typing.Optional[str] = None
    scan_save_states: typing.Optional[bool] = None  # Triton scan: keep states for the backward (faster, more memory)
    cls_mode: typing.Optional[str] = None           # middle | head | double | mean | max
    bidir_mode: typing.Optional[str] = None         # v2 | ssm | block | sequence | none
    scan_orders: typing.Optional[typing.List[str]] = None   # v2 only: [row, row_reverse, col, col_reverse, ...]

    def kwargs(self):
        """The constructor kwargs that were set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}


@dataclass
class DataConfig:
    train_shards: str = ""          # brace pattern(s), "::"-separated sources; empty = the embedded default data
    eval_shards: str = ""
    train_samples: int = 0          # epoch size when the shards have no info.json
    eval_samples: int = 0
    batch_size: int = 64            # per GPU (micro-batch)
    eval_batch_size: int = 0        # 0 = batch_size
    num_workers: int = 4
    num_classes: int = 0            # 0 = from the shards' info.json / classes.json
    input_size: int = 224
    resampled: bool = False         # draw shards with replacement, fixed samples per epoch (multi-node)
    shuffle_buffer: int = 2000
    repeated_aug: int = 1           # training: each image read gives this many augmented copies in its batch
                                    # (DeiT: 3); an epoch keeps its steps, so it reads 1 / repeated_aug of the data
    cache_dir: str = ""             # where the embedded default data set is generated; "" = ~/.cache


@dataclass
class AugmentConfig:
    scale_min: float = 0.08         # RandomResizedCrop scale lower bound
    hflip: float = 0.5
    auto_augment: str = ""          # timm RandAugment string, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float = 0.0
    re_prob: float = 0.0            # random erasing
    interpolation: str = "bicubic"
    crop_pct: float = 0.875         # eval: resize to input_size / crop_pct, center crop
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0          # label smoothing


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0              # stop after this many optimizer steps (0 = epochs decide)
    save_every: int = 0             # checkpoint every N optimizer steps (0 = at the end only)
    keep_checkpoints: int = 2       # newest complete checkpoints kept on disk
    resume: str = "auto"            # auto | none | a checkpoint folder
    log_every: int = 10
    eval_every: int = 1             # evaluate every N epochs (0 = at the end only)
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32: autocast; parameters stay fp32
    grad_accum: int = 1
    clip_grad: float = 1.0          # max gradient norm (0 = off)
    max_bad_steps: int = 5          # non-finite losses in a row before the run stops
    grad_checkpointing: bool = False
    cuda_graph: bool = False        # ZeRO-0: network fwd + bwd replayed from a CUDA graph (engine/cuda_graph.py)
    compile: bool = False           # the training network call through torch.compile (engine/cuda_graph.py)


@dataclass
class OptimConfig:
    name: str = "adamw"             # adamw | lars | sgd
    lr: float = 0.0                 # absolute peak lr; 0 = blr * global batch / lr_base_batch
    blr: float = 1.5e-4
    lr_base_batch: int = 256
    min_lr: float = 0.0
    warmup_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: int = 0           # overrides warmup_epochs when > 0
    weight_decay: float = 0.05
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.9
    layer_decay: float = 1.0        # < 1: layer-wise lr decay through the model's group_matcher


@dataclass
class MaeConfig:
    mask_ratio: float = 0.75
    mask_mode: str = "drop"         # drop: encoder sees visible tokens only; keep: mask tokens stay in the sequence
    mask_block: int = 1             # side, in patches, of the square blocks masked together (1: per patch, as MAE)
    decoder: str = "transformer"    # transformer | vim
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    num_vis: int = 8                # images in the reconstruction grid written at each checkpoint


@dataclass
class ClipConfig:
    embed_dim: int = 512
    text_model: str = ""            # an open_clip bundled model name whose text tower to use; "" = the fields below
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    init_logit_scale: float = 2.6592600   # ln(1/0.07)
    max_logit_scale: float = 4.6051702    # ln(100)
    init_image_from: str = ""       # an exported encoder (e.g. from MAE) to start the image tower from
    zeroshot_templates: str = "imagenet"   # imagenet | simple | your own: "a photo of a {}.|a {} in the wild"


@dataclass
class FinetuneConfig:
    pretrained: str = ""            # an encoder to start from: our export or a public Vim checkpoint
    head_init_std: float = 0.02
    ema: bool = False
    ema_decay: float = 0.9999
    cache_features: bool = False    # linprobe: extract features once, train the head on them


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    deepspeed: str = "configs/deepspeed/zero1.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _check_value(key, value, tp):
    """Return value converted to type tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_value(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values, prefix=""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (known under {prefix or 'top level'}: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full!r}: expected a mapping, got {value!r}")
            kwargs[key] = _build(tp, value, full + ".")
        else:
            kwargs[key] = _check_value(full, value, tp)
    return cls(**kwargs)


def _merge(base, update):
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_path(path, relative_to):
    for candidate in (Path(relative_to) / path, CONFIG_ROOT / path, Path(path)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def _load_yaml(path):
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    merged = {}
    for parent in values.pop("defaults", None) or []:
        merged = _merge(merged, _load_yaml(_resolve_path(parent, path.parent)))
    return _merge(merged, values)


def parse_override(text):
    """'a.b=value' -> {'a': {'b': value}}, value parsed as YAML (so 3 is int, 1e-3 float, [1,2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    node = yaml.safe_load(raw) if raw != "" else ""
    for part in reversed(key.strip().split(".")):
        node = {part: node}
    return node


def load_config(path=None, overrides=(), base=None):
    """Build a validated RunConfig from an optional YAML file, then `key.sub=value` overrides.

    base: a dict of values applied before the file (an entry point's own defaults).
    """
    values = dict(base or {})
    if path:
        values = _merge(values, _load_yaml(_resolve_path(path, Path.cwd())))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(RunConfig, values)


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def save_config(cfg, path):
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
