"""Fine-tuning tasks: nn.Modules whose forward(batch) returns (loss, metrics)."""
from .classification import Classifier, prefixed_group_matcher
from .linprobe import LinearProbe, extract_features

__all__ = ["Classifier", "LinearProbe", "extract_features", "prefixed_group_matcher"]
