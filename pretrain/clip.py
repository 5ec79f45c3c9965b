"""CLIP-style image-text contrastive pretraining of a Vim image tower ("Learning Transferable Visual Models
From Natural Language Supervision", arXiv 2103.00020), with open_clip's text tower and tokenizer.

The loss gathers features from all ranks with a differentiable all_gather; each rank scores its own rows
against every column, so the mean over ranks is the loss of the global batch, and DeepSpeed's gradient
averaging gives exactly the single-process gradient of that loss.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from timm.utils import accuracy

__all__ = ["ClipLoss", "ClipModel", "Tokenizer", "build_text_tower", "zeroshot_templates"]

ZEROSHOT_TEMPLATES = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


def zeroshot_templates(spec):
    """A bundled template set by name (imagenet | simple), or your own: "a photo of a {}.|a {} in the dark"."""
    if spec in ZEROSHOT_TEMPLATES:
        return ZEROSHOT_TEMPLATES[spec]
    if "{}" not in spec:
        raise ValueError(f"zero-shot templates {spec!r}: a name ({', '.join(ZEROSHOT_TEMPLATES)}) or strings with {{}}")
    return tuple(spec.split("|"))


class Tokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: works offline); str -> (context_length,)."""

    def __init__(self, context_length=77):
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts):
        if isinstance(texts, str):
            return self.tokenizer([texts])[0]
        return self.tokenizer(list(texts))


def build_text_tower(embed_dim, text_model="", context_length=77, vocab_size=49408, width=512, heads=8, layers=12):
    """open_clip's TextTransformer with random weights, from a bundled model config's text_cfg or the sizes."""
    if text_model:
        import open_clip
        model_cfg = open_clip.get_model_config(text_model)
        if model_cfg is None:
            raise ValueError(f"clip.text_model={text_model!r} is not a bundled open_clip config")
        text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
    else:
        text_cfg = CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                               layers=layers)
    return _build_text_tower(embed_dim, text_cfg)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows concatenated; the backward sums every rank's gradient of this rank's rows."""

    @staticmethod
    def forward(ctx, features):
        ctx.rank, ctx.rows = torch.distributed.get_rank(), features.shape[0]
        parts = [torch.empty_like(features) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _gather(features, world_size):
    """All ranks' features concatenated, differentiable (gradients flow back to their own rank)."""
    return features if world_size == 1 else _GatherWithGrad.apply(features)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; this rank's rows against all columns."""

    def __init__(self, rank=0, world_size=1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features, text_features, logit_scale):
        """image_features, text_features: (local batch, embed_dim), L2-normalised; logit_scale: exp'd scalar."""
        n = image_features.shape[0]
        all_images = _gather(image_features, self.world_size)
        all_texts = _gather(text_features, self.world_size)
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        logits_per_image = logit_scale * image_features @ all_texts.t()
        logits_per_text = logit_scale * text_features @ all_images.t()
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipModel(nn.Module):
    """Vim image tower (class-token features -> linear projection) + open_clip text tower + logit scale.

    forward(batch) -> (loss, metrics) with batch {"image": (batch, C, H, W), "text": (batch, context) tokens}.
    """

    best_metric = "zeroshot_top1"
    plot_keys = ("zeroshot_top1", "logit_scale")

    def __init__(self, encoder, text, embed_dim, model_config, rank=0, world_size=1, init_logit_scale=math.log(1 / 0.07),
                 max_logit_scale=math.log(100), classnames=None, templates=OPENAI_IMAGENET_TEMPLATES, tokenizer=None):
        """
        Args:
            encoder: a models.VisionMamba without head (num_classes=0).
            text: open_clip TextTransformer projecting to embed_dim (see build_text_tower).
            embed_dim: the shared embedding width.
            model_config: {"name", "kwargs"} of the encoder, stored with its export.
            rank, world_size: for the gathered loss.
            init_logit_scale, max_logit_scale: ln of the initial and the largest inverse temperature.
            classnames, templates, tokenizer: zero-shot evaluation (class names of the eval labels).
        """
        super().__init__()
        self.visual = encoder
        self.visual_proj = nn.Linear(encoder.num_features, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=encoder.num_features ** -0.5)
        self.text = text
        # shape (1,), not a 0-d tensor: DeepSpeed cannot broadcast 0-d parameters
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.max_logit_scale = max_logit_scale
        self.loss_fn = ClipLoss(rank, world_size)
        self.model_config = model_config
        self.classnames, self.templates, self.tokenizer = classnames, templates, tokenizer
        self._zeroshot = None          # (weights, steps seen) cache of the zero-shot classifier
        self._steps = 0
        self.graphed_image = None      # train.cuda_graph: a GraphedTraining of encode_image (engine/cuda_graph.py)

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()} | {"logit_scale"}
        return names | {f"text.{n}" for n, p in self.text.named_parameters() if "embedding" in n}

    def encode_image(self, images, normalize=True):
        feats = self.visual.forward_head(self.visual.forward_features(images), pre_logits=True)
        feats = self.visual_proj(feats)
        return F.normalize(feats.float(), dim=-1) if normalize else feats

    def encode_text(self, tokens, normalize=True):
        feats = self.text(tokens)
        return F.normalize(feats.float(), dim=-1) if normalize else feats

    def scale(self):
        # clamped where it is used: holds under every ZeRO stage, whose fp32 master copy lives in the optimizer
        return self.logit_scale.clamp(0, self.max_logit_scale).exp()

    def forward(self, batch):
        image_features = (self.graphed_image or self.encode_image)(batch["image"])
        text_features = self.encode_text(batch["text"])
        scale = self.scale()
        return self.loss_fn(image_features, text_features, scale), {"logit_scale": scale.detach()}

    def graph_network(self, wrap):
        # the image tower only: the text tower is small, and the loss gathers features over ranks
        self.graphed_image = wrap(self, "encode_image")

    def on_step_end(self):
        self._steps += 1

    def zeroshot_weights(self):
        """(embed_dim, classes) classifier from class names x prompt templates, rebuilt after each step."""
        if self._zeroshot is None or self._zeroshot[1] != self._steps:
            device = self.logit_scale.device
            weights = build_zero_shot_classifier(self, self.tokenizer, self.classnames, self.templates,
                                                 num_classes_per_batch=10, device=device)
            self._zeroshot = (weights.float(), self._steps)
        return self._zeroshot[0]

    def evaluate_batch(self, batch):
        """Zero-shot top-1 / top-5 (percent) on labelled images, as (sum, count)."""
        if not self.classnames:
            return {}
        labels = batch["label"]
        n = labels.shape[0]
        logits = 100.0 * self.encode_image(batch["image"]) @ self.zeroshot_weights()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, len(self.classnames))))
        return {"zeroshot_top1": (top1.item() * n, n), "zeroshot_top5": (top5.item() * n, n)}

    def export_state(self):
        """The image encoder's weights (what fine-tuning starts from) and its config."""
        return self.visual.state_dict(), self.model_config
