"""Masked image modeling for Vim encoders, after MAE ("Masked Autoencoders Are Scalable Vision Learners",
arXiv 2111.06377), adapted to a sequential scan.

Two masking modes:
- "drop" (MAE): the encoder reads only the visible tokens, kept in raster order, with the class tokens
  where the encoder's cls_mode puts them in the visible sequence (middle: in its middle); the decoder
  re-inserts mask tokens in place.
- "keep": the encoder reads the whole grid with a learned mask token in the masked slots, so the scan
  sees a spatially continuous sequence (dropping tokens breaks the neighbourhoods a scan relies on).
Masks are drawn per patch (MAE) or per square block of mask_block x mask_block patches (BEiT / SimMIM-style
blocks: the visible tokens come in small 2-D groups, so the scan still sees neighbours next to each other).
The loss is the MSE on masked patches, optionally on per-patch normalised pixels (norm_pix_loss).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block as TransformerBlock

from models import Block as VimBlock
from models import RMSNorm

__all__ = ["MaskedAutoencoder", "random_masking", "patchify", "unpatchify"]


def patchify(imgs, patch_size, stride):
    """imgs: (batch, C, H, W) -> patches (batch, M, patch_size**2 * C), one row per patch-embedding window."""
    return F.unfold(imgs, kernel_size=patch_size, stride=stride).transpose(1, 2)


def unpatchify(patches, patch_size, stride, img_size):
    """patches: (batch, M, patch_size**2 * C) -> imgs (batch, C, H, W); overlapping windows are averaged."""
    cols = patches.transpose(1, 2)
    imgs = F.fold(cols, img_size, kernel_size=patch_size, stride=stride)
    counts = F.fold(torch.ones_like(cols), img_size, kernel_size=patch_size, stride=stride)
    return imgs / counts


def random_masking(batch, num_patches, mask_ratio, device, generator=None, grid_size=None, block=1):
    """Per-sample random masking of patches, or of square blocks of block x block patches on a grid_size grid.

    Returns ids_keep: (batch, K) visible patch indices sorted ascending (raster order), and
    mask: (batch, M) with 0 = visible, 1 = masked (MAE's convention). K is the same for every sample; with blocks,
    whole blocks are kept in a random order and the last one kept may be cut (a random subset of its patches).
    """
    num_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    if block > 1:
        gh, gw = grid_size
        cells = torch.rand(batch, -(-gh // block), -(-gw // block), device=device, generator=generator)
        rank = cells.flatten(1).argsort(1).argsort(1).view_as(cells).to(noise.dtype)   # each block's place in line
        rank = rank.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :gh, :gw].reshape(batch, -1)
        noise = rank + noise                     # blocks in random order, patches in random order inside a block
    ids_keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    mask = torch.ones(batch, num_patches, device=device).scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


class MaskedAutoencoder(nn.Module):
    """A Vim encoder with a light decoder that predicts the pixels of masked patches.

    forward(batch) -> (loss, metrics) as the engine expects; batch["image"]: (batch, C, H, W).
    """

    def __init__(
            self,
            encoder,
            model_config: dict,
            mask_ratio: float = 0.75,
            mask_mode: str = "drop",
            mask_block: int = 1,
            decoder: str = "transformer",
            decoder_embed_dim: int = 512,
            decoder_depth: int = 8,
            decoder_num_heads: int = 16,
            norm_pix_loss: bool = True,
            vis_images=None,
            pixel_mean=(0.485, 0.456, 0.406),
            pixel_std=(0.229, 0.224, 0.225),
    ):
        """
        Args:
            encoder: a models.VisionMamba (its head is not used).
            model_config: {"name": timm name, "kwargs": {...}} that rebuilds the encoder; stored in the export.
            mask_ratio: fraction of patches masked per sample.
            mask_mode: "drop" (visible tokens only) or "keep" (mask tokens in the encoder's sequence).
            mask_block: side, in patches, of the square blocks masked together (1: each patch on its own).
            decoder: "transformer" (ViT blocks, as MAE) or "vim" (bidirectional Mamba blocks).
            decoder_embed_dim, decoder_depth, decoder_num_heads: decoder size (heads: transformer only).
            norm_pix_loss: regress per-patch normalised pixels.
            vis_images: (n, C, H, W) fixed normalised images for the reconstruction grid, or None.
            pixel_mean, pixel_std: the input normalisation, undone for the grid.
        """
        super().__init__()
        assert 0.0 < mask_ratio < 1.0, "mask_ratio must be in (0, 1)"
        assert mask_mode in ("drop", "keep"), f"mask_mode must be drop or keep, got {mask_mode!r}"
        assert decoder in ("transformer", "vim"), f"decoder must be transformer or vim, got {decoder!r}"
        grid = encoder.patch_embed.grid_size
        assert 1 <= mask_block <= min(grid), \
            f"mask_block must be in [1, {min(grid)}] for a {grid} grid, got {mask_block}"
        self.encoder = encoder
        self.model_config = model_config
        self.mask_ratio = mask_ratio
        self.mask_mode = mask_mode
        self.mask_block = mask_block
        self.norm_pix_loss = norm_pix_loss
        self.graphed_loss = None  # train.cuda_graph: a GraphedTraining of image_loss (engine/cuda_graph.py)
        pe = encoder.patch_embed
        self.patch_size, self.stride = pe.proj.kernel_size[0], pe.proj.stride[0]
        self.img_size = pe.img_size
        in_chans, D = pe.proj.in_channels, encoder.embed_dim
        M = encoder.num_patches
        # drop: the decoder fills the masked slots; keep: the encoder does (and the decoder reads its outputs)
        if mask_mode == "keep":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        else:
            self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_embed = nn.Linear(D, decoder_embed_dim)
        # fixed 2-D sin-cos position embedding (as MAE), zeros in the class slots (the encoder's layout; an
        # encoder without class token, cls_mode mean / max, gives a decoder sequence of patches only)
        grid_pos = build_sincos2d_pos_embed(pe.grid_size, decoder_embed_dim).reshape(1, M, decoder_embed_dim)
        pos = encoder.join_cls(grid_pos, torch.zeros(1, encoder.num_cls_tokens, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        if decoder == "transformer":
            self.decoder_blocks = nn.ModuleList([
                TransformerBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(decoder_depth)])
            self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        else:
            self.decoder_blocks = nn.ModuleList([VimBlock(decoder_embed_dim) for _ in range(decoder_depth)])
            for block in self.decoder_blocks:
                block.mixer.init_weights()
            self.decoder_norm = RMSNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * in_chans)
        self.register_buffer("vis_images", vis_images if vis_images is not None else torch.empty(0), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, -1, 1, 1), persistent=False)
        self._init_decoder()

    def _init_decoder(self):
        trunc_normal_(self.mask_token if self.mask_mode == "keep" else self.decoder_mask_token, std=0.02)
        # MAE's init for its Linear layers; Vim decoder blocks keep their own (A, D, dt) initialisation
        linears = [self.decoder_embed, self.decoder_pred]
        if not isinstance(self.decoder_blocks[0], VimBlock):
            linears += [m for m in self.decoder_blocks.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        names.add("mask_token" if self.mask_mode == "keep" else "decoder_mask_token")
        for i, block in enumerate(self.decoder_blocks):
            if isinstance(block, VimBlock):
                names |= {f"decoder_blocks.{i}.mixer.{p}" for p in block.mixer.no_weight_decay()}
        return names

    def forward_encoder(self, imgs, generator=None):
        """imgs: (batch, C, H, W) -> encoded tokens with the class tokens at their slots, ids_keep, mask.

        drop: tokens (batch, K + c, D), class tokens at enc.cls_positions(K) (middle: K // 2); keep: (batch, M + c, D),
        class tokens at enc.cls_positions(M). c = enc.num_cls_tokens (0 for mean / max pooling encoders).
        """
        enc = self.encoder
        n = imgs.shape[0]
        ids_keep, mask = random_masking(n, enc.num_patches, self.mask_ratio, imgs.device, generator,
                                        enc.patch_embed.grid_size, self.mask_block)
        if self.mask_mode == "drop":
            tokens = enc.patch_tokens(imgs)                                   # position added before masking
            tokens = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            # 2-D scan orders visit the visible patches by their grid positions
            return enc.forward_blocks(enc.insert_cls(tokens), patch_ids=ids_keep), ids_keep, mask
        tokens = enc.patch_embed(imgs)
        tokens = torch.where(mask.unsqueeze(-1).bool(), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + enc.patch_pos_embed()
        return enc.forward_blocks(enc.insert_cls(tokens)), ids_keep, mask

    def forward_decoder(self, latent, ids_keep):
        """latent: encoder output -> predicted pixels of every patch, (batch, M, patch_size**2 * C)."""
        enc = self.encoder
        x = self.decoder_embed(latent)
        n, _, Dd = x.shape
        if self.mask_mode == "drop":
            cls, visible = enc.split_cls(x)
            patches = self.decoder_mask_token.to(x.dtype).expand(n, enc.num_patches, Dd).clone()
            patches = patches.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), visible)   # back in place
            x = enc.join_cls(patches, cls)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return enc.split_cls(x)[1]

    def target(self, imgs):
        """Regression target per patch: pixels, normalised per patch when norm_pix_loss."""
        target = patchify(imgs, self.patch_size, self.stride).float()
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error over the masked patches. pred: (batch, M, p*p*C); mask: (batch, M), 1 = masked."""
        loss = (pred.float() - self.target(imgs)).pow(2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def image_loss(self, imgs):
        """The MAE loss of a batch of images, fresh masks drawn on the images' device."""
        latent, ids_keep, mask = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_keep)
        return self.forward_loss(imgs, pred, mask)

    def forward(self, batch):
        return (self.graphed_loss or self.image_loss)(batch["image"]), {}

    def graph_network(self, wrap):
        self.graphed_loss = wrap(self, "image_loss")

    @torch.no_grad()
    def reconstruct(self, imgs, generator=None):
        """imgs (normalised) -> (masked input, reconstruction with the visible patches pasted back), both
        in normalised pixel space, (batch, C, H, W)."""
        latent, ids_keep, mask = self.forward_encoder(imgs, generator)
        pred = self.forward_decoder(latent, ids_keep).float()
        patches = patchify(imgs, self.patch_size, self.stride).float()
        if self.norm_pix_loss:   # undo the per-patch normalisation with the true patch statistics, for display
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
        m = mask.unsqueeze(-1)
        masked = unpatchify(patches * (1 - m), self.patch_size, self.stride, self.img_size)
        recon = unpatchify(patches * (1 - m) + pred * m, self.patch_size, self.stride, self.img_size)
        return masked, recon

    def visualize(self, path):
        """Write a grid of rows (image, masked input, reconstruction) for the fixed images; same masks each time."""
        if self.vis_images.numel() == 0:
            return
        was_training = self.training
        self.eval()
        generator = torch.Generator(device=self.vis_images.device).manual_seed(0)
        masked, recon = self.reconstruct(self.vis_images, generator)
        self.train(was_training)
        if path is None:
            return
        from torchvision.utils import save_image
        rows = torch.cat([self.vis_images.float(), masked, recon])
        rows = (rows * self.pixel_std + self.pixel_mean).clamp(0, 1)
        save_image(rows, str(path), nrow=self.vis_images.shape[0], padding=1)

    def export_state(self):
        """The encoder's weights (no head) and its model config."""
        return self.encoder.state_dict(), self.model_config
