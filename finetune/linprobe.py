"""Linear probing (MAE's protocol): a frozen encoder's class-token features, BatchNorm1d without affine
parameters, and a linear head, trained with LARS."""
import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.utils import accuracy

__all__ = ["LinearProbe", "extract_features"]


class LinearProbe(nn.Module):
    """forward(batch) -> (loss, metrics). batch["image"] (batch, C, H, W), or batch["features"] (batch, D)
    when the features were extracted once beforehand; batch["label"] (batch,)."""

    best_metric = "top1"
    plot_keys = ("top1",)

    def __init__(self, encoder, num_classes, model_config):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.model_config = model_config
        self.num_classes = num_classes
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.num_features, affine=False, eps=1e-6),
                                  nn.Linear(encoder.num_features, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()   # frozen: no dropout, drop path or statistics updates
        return self

    def features(self, batch):
        if "features" in batch:
            return batch["features"].float()
        with torch.no_grad():
            return self.encoder.forward_head(self.encoder.forward_features(batch["image"]), pre_logits=True).float()

    def forward(self, batch):
        logits = self.head(self.features(batch))
        return nn.functional.cross_entropy(logits, batch["label"]), {}

    def evaluate_batch(self, batch):
        labels = batch["label"]
        n = labels.shape[0]
        logits = self.head(self.features(batch))
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, self.num_classes)))
        return {"top1": (top1.item() * n, n), "top5": (top5.item() * n, n)}

    def export_state(self):
        """The encoder with the probe folded in as its head is not a plain Linear; export the head alone."""
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}, self.model_config


@torch.no_grad()
def extract_features(encoder, batches, device, autocast_dtype=None):
    """Class-token features of every batch: returns (features (n, D) float32 on CPU, labels (n,))."""
    encoder.eval()
    feats, labels = [], []
    for batch in batches:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            images = batch["image"].to(device, non_blocking=True)
            f = encoder.forward_head(encoder.forward_features(images), pre_logits=True)
        feats.append(f.float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)
