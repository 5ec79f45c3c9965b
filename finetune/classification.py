"""Supervised classification of a Vim encoder: ImageNet fine-tuning, any labelled shards, training from scratch.

timm's pieces throughout: Mixup/CutMix with SoftTargetCrossEntropy, label smoothing, layer-wise lr decay
through the model's group_matcher, ModelEmaV3, top-1/top-5 accuracy.
"""
import copy
import re

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, accuracy

__all__ = ["Classifier", "prefixed_group_matcher"]


def prefixed_group_matcher(model, prefix):
    """model.group_matcher() with every pattern anchored under `prefix.` (for a wrapped model)."""
    def rewrite(pattern):
        return re.sub(r"\^", "^" + re.escape(prefix + "."), pattern)

    matcher = model.group_matcher()
    return {
        "stem": rewrite(matcher["stem"]),
        "blocks": [(rewrite(p), suffix) for p, suffix in matcher["blocks"]],
    }


class Classifier(nn.Module):
    """A classification model trained with cross-entropy (soft targets under Mixup/CutMix).

    forward(batch) -> (loss, metrics) with batch {"image": (batch, C, H, W), "label": (batch,)}.
    """

    best_metric = "top1"
    plot_keys = ("top1",)

    def __init__(self, model, num_classes, model_config, mixup=0.0, cutmix=0.0, smoothing=0.0, ema_decay=None):
        """
        Args:
            model: a timm classifier (a models.VisionMamba with a head of num_classes outputs).
            num_classes: classes of the data; must equal the head's outputs.
            model_config: {"name", "kwargs"} that rebuilds the model; stored with the export.
            mixup, cutmix: alphas of timm's Mixup (0 = off); smoothing: label smoothing.
            ema_decay: keep an exponential moving average of the weights (None = off).
        """
        super().__init__()
        head_classes = getattr(model, "num_classes", num_classes)
        if head_classes != num_classes:
            raise ValueError(f"the model's head has {head_classes} outputs but the data has {num_classes} classes")
        self.model = model
        self.model_config = model_config
        self.num_classes = num_classes
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema_decay = ema_decay
        # the EMA lives outside the module tree, so DeepSpeed neither shards nor saves it twice;
        # its weights travel in the checkpoint's client state (extra_state)
        object.__setattr__(self, "ema", None)
        self.graphed_model = None  # train.cuda_graph: a GraphedTraining of self.model (engine/cuda_graph.py)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        return prefixed_group_matcher(self.model, "model")

    def forward(self, batch):
        images, labels = batch["image"], batch["label"]
        if self.ema_decay is not None and self.ema is None:
            if any(hasattr(p, "ds_id") for p in self.model.parameters()):
                raise ValueError("finetune.ema needs whole parameters on every rank: use ZeRO stage 0, 1 or 2, not 3")
            object.__setattr__(self, "ema", ModelEmaV3(self.model, decay=self.ema_decay))
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        logits = (self.graphed_model or self.model)(images)
        return self.criterion(logits.float(), labels), {}

    def graph_network(self, wrap):
        self.graphed_model = wrap(self.model)

    def on_step_end(self):
        if self.ema is not None:
            self.ema.update(self.model)

    def evaluate_batch(self, batch):
        """Top-1 / top-5 (percent) of the model and of its EMA, as (sum, count)."""
        images, labels = batch["image"], batch["label"]
        n = labels.shape[0]
        k = min(5, self.num_classes)
        out = {}
        for prefix, net in (("", self.model), ("ema_", self.ema.module if self.ema is not None else None)):
            if net is None:
                continue
            logits = net(images).float()
            top1, top5 = accuracy(logits, labels, topk=(1, k))
            out[f"{prefix}top1"] = (top1.item() * n, n)
            out[f"{prefix}top5"] = (top5.item() * n, n)
            out[f"{prefix}eval_loss"] = (nn.functional.cross_entropy(logits, labels).item() * n, n)
        return out

    def extra_state(self):
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def load_extra_state(self, state):
        if state and state.get("ema") is not None:
            object.__setattr__(self, "ema", ModelEmaV3(copy.deepcopy(self.model), decay=self.ema_decay))
            self.ema.load_state_dict(state["ema"])

    def export_state(self):
        """The model's weights (head included) and its config; the EMA's when it is kept."""
        net = self.ema.module if self.ema is not None else self.model
        return net.state_dict(), self.model_config
