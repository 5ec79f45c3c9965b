"""Image transforms: timm's create_transform with this project's defaults.

MAE pretraining passes scale=(0.2, 1.0) and no auto_augment (RandomResizedCrop + flip only); fine-tuning
passes a RandAugment string such as "rand-m9-mstd0.5-inc1" and re_prob=0.25.
"""
from typing import Callable, Optional, Sequence, Tuple

from PIL import ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = ["build_transform"]


def build_transform(
        is_training: bool,
        input_size: int,
        *,
        scale: Tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
        color_jitter: Optional[float] = None,
        interpolation: str = "bicubic",
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """PIL image -> normalised float tensor (3, input_size, input_size).

    Training: RandomResizedCrop(scale) + flip (+ RandAugment, colour jitter, random erasing when set).
    Evaluation: resize the short side to input_size / crop_pct, centre crop.
    Falsy auto_augment / color_jitter (None, "", 0) mean "off"; timm would otherwise default jitter to 0.4.
    """
    transform = create_transform(
        input_size,
        is_training=is_training,
        scale=tuple(scale),
        hflip=hflip,
        auto_augment=auto_augment or None,
        re_prob=re_prob,
        color_jitter=color_jitter or None,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )
    _guard_posterize(transform)
    return transform


def _posterize(img, bits_to_keep, **_):
    # NOTE: timm's PosterizeIncreasing reaches 0 bits at magnitude 10 (m9 with mstd0.5 noise, clipped at 10).
    # Pillow < 13 turned that into a black image, Pillow >= 13 raises; 1 bit is the strongest valid posterize.
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


def _guard_posterize(transform) -> None:
    """Swap the posterize function of this transform's RandAugment / AutoAugment / AugMix ops (not timm's)."""
    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize
