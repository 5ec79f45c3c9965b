"""Pretraining objectives: nn.Modules whose forward(batch) returns (loss, metrics)."""
from .mae import MaskedAutoencoder, patchify, random_masking, unpatchify

__all__ = ["MaskedAutoencoder", "random_masking", "patchify", "unpatchify"]
