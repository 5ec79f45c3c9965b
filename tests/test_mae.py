"""MAE objective: masking, token order, the middle class token, reconstruction targets and the loss."""
import pytest
import timm
import torch

import models  # noqa: F401
from pretrain.mae import MaskedAutoencoder, patchify, random_masking, unpatchify


def tiny_encoder(**kw):
    return timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                             num_classes=0, **kw)


def tiny_mae(**kw):
    kw = dict(dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), **kw)
    return MaskedAutoencoder(tiny_encoder(), {"name": "vim_tiny_patch16_224", "kwargs": {}}, **kw)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_random_masking_ratio_order_and_restore(ratio):
    torch.manual_seed(0)
    ids_keep, mask = random_masking(5, 64, ratio, "cpu")
    keep = int(round(64 * (1 - ratio)))
    assert ids_keep.shape == (5, keep)
    assert (mask.sum(1) == 64 - keep).all()
    assert (ids_keep.diff(dim=1) > 0).all()                       # visible tokens stay in raster order
    assert (mask.gather(1, ids_keep) == 0).all()                  # and are exactly the unmasked ones
    assert len({tuple(r.tolist()) for r in ids_keep}) == 5       # per-sample masks


@pytest.mark.parametrize("ratio, cut_blocks", [(0.75, 0), (0.7, 1)])
def test_block_masking_keeps_whole_blocks(ratio, cut_blocks):
    torch.manual_seed(0)
    ids_keep, mask = random_masking(6, 64, ratio, "cpu", grid_size=(8, 8), block=2)
    keep = int(round(64 * (1 - ratio)))
    assert ids_keep.shape == (6, keep) and (mask.sum(1) == 64 - keep).all()
    assert (ids_keep.diff(dim=1) > 0).all() and (mask.gather(1, ids_keep) == 0).all()
    visible_per_block = (1 - mask).view(6, 4, 2, 4, 2).sum((2, 4))          # (sample, block row, block col)
    partial = ((visible_per_block > 0) & (visible_per_block < 4)).sum((1, 2))
    assert (partial == cut_blocks).all()                           # whole blocks, except one cut at the count
    assert len({tuple(r.tolist()) for r in ids_keep}) == 6


def test_block_masking_on_a_grid_that_blocks_do_not_tile():
    ids_keep, mask = random_masking(3, 49, 0.5, "cpu", grid_size=(7, 7), block=2)
    assert ids_keep.shape == (3, 24) and (mask.sum(1) == 25).all() and ids_keep.max() < 49


def test_mae_with_block_masking_trains_and_checks_the_block_size():
    mae = tiny_mae(mask_block=2)
    loss, _ = mae({"image": torch.randn(2, 3, 32, 32)})
    loss.backward()
    assert torch.isfinite(loss) and mae.encoder.patch_embed.proj.weight.grad is not None
    for bad in (0, 5):                                             # tiny encoder: a 4 x 4 grid
        with pytest.raises(AssertionError, match="mask_block must be in"):
            tiny_mae(mask_block=bad)


def test_patchify_roundtrip_including_overlapping_windows():
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.allclose(unpatchify(patchify(imgs, 8, 8), 8, 8, (32, 32)), imgs)
    assert torch.allclose(unpatchify(patchify(imgs, 8, 4), 8, 4, (32, 32)), imgs, atol=1e-6)
    assert patchify(imgs, 8, 8).shape == (2, 16, 192)


def test_drop_mode_puts_class_token_in_the_middle_of_visible_tokens(monkeypatch):
    mae = tiny_mae(mask_ratio=0.75)
    seen = {}
    monkeypatch.setattr(mae.encoder, "forward_blocks", lambda x, **kw: seen.setdefault("x", x))
    imgs = torch.randn(2, 3, 32, 32)
    _, ids_keep, _ = mae.forward_encoder(imgs)
    x = seen["x"]
    assert x.shape == (2, 4 + 1, 32)
    cls = mae.encoder.cls_token_with_pos()[0, 0]
    assert torch.allclose(x[:, 2], cls.expand(2, -1))             # K=4 visible -> class token at index 2
    tokens = mae.encoder.patch_tokens(imgs)                       # position embedding added before masking
    visible = torch.cat([x[:, :2], x[:, 3:]], dim=1)
    assert torch.allclose(visible, tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 32)))


def test_keep_mode_feeds_whole_grid_with_mask_tokens(monkeypatch):
    mae = tiny_mae(mask_mode="keep")
    seen = {}
    monkeypatch.setattr(mae.encoder, "forward_blocks", lambda x, **kw: seen.setdefault("x", x))
    imgs = torch.randn(2, 3, 32, 32)
    _, _, mask = mae.forward_encoder(imgs)
    x = seen["x"]
    enc = mae.encoder
    assert x.shape == (2, 17, 32)
    grid = torch.cat([x[:, :enc.cls_index], x[:, enc.cls_index + 1:]], dim=1)
    expected_masked = mae.mask_token[0, 0] + enc.patch_pos_embed()[0]
    m = mask.bool()
    assert torch.allclose(grid[m], expected_masked.expand(2, -1, -1)[m])
    assert torch.allclose(grid[~m], enc.patch_tokens(imgs)[~m])


def test_loss_on_a_known_input():
    mae = tiny_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 8, 8)
    mask = torch.zeros(2, 16)
    mask[:, :4] = 1
    assert mae.forward_loss(imgs, target, mask).item() == 0.0
    pred = target + 2.0 * mask.unsqueeze(-1) + 5.0 * (1 - mask.unsqueeze(-1))   # error 2 on masked, 5 elsewhere
    assert mae.forward_loss(imgs, pred, mask).item() == pytest.approx(4.0)
    normed = tiny_mae(norm_pix_loss=True).target(imgs)
    assert torch.allclose(normed.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(normed.std(-1), torch.ones(2, 16), atol=1e-2)


@pytest.mark.parametrize("mode", ["drop", "keep"])
@pytest.mark.parametrize("decoder", ["transformer", "vim"])
def test_forward_backward_and_reconstruction(mode, decoder):
    torch.manual_seed(0)
    mae = tiny_mae(mask_mode=mode, decoder=decoder, vis_images=torch.randn(3, 3, 32, 32))
    loss, _ = mae({"image": torch.randn(4, 3, 32, 32)})
    loss.backward()
    trainable = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert not trainable, trainable
    masked, recon = mae.reconstruct(mae.vis_images, torch.Generator().manual_seed(0))
    assert masked.shape == recon.shape == (3, 3, 32, 32)
    # visible patches are pasted back unchanged
    keep = masked != 0
    assert torch.allclose(recon[keep], mae.vis_images[keep], atol=1e-5)


def test_export_is_a_loadable_encoder(tmp_path):
    from engine.checkpoint import export_encoder
    mae = tiny_mae()
    state, cfg = mae.export_state()
    path = export_encoder(state, {"name": "vim_tiny_patch16_224", "kwargs": {}}, tmp_path / "enc.safetensors")
    fresh = tiny_encoder()
    assert models.load_checkpoint(fresh, path) == []
    assert torch.equal(fresh.layers[0].mixer.A_b_log, mae.encoder.layers[0].mixer.A_b_log)
