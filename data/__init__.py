"""Data: WebDataset shards in (build_loader) and out (make_shards), transforms, and the embedded default data set.

Never imports models/, engine/, pretrain/ or finetune/, and takes plain keyword arguments, not config objects.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .features import FeatureData
from .info import read_info
from .loader import DataInfo, build_loader
from .synthetic import default_dataset
from .transforms import build_transform

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "DataInfo", "FeatureData", "build_loader", "build_transform",
           "default_dataset", "read_info"]
