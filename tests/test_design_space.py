"""The paper's design space as configuration: class-token strategies, bidirectional strategies, 2-D scan orders.

Tiny models (embed_dim 32, depth 2, 32x32 images, patch 8: a 4x4 grid) on the reference scan, except one
4-direction model run through the Triton kernel under the interpreter.
"""
import json

import pytest
import timm
import torch

from engine.config import load_config
from engine.setup import adopt_export_design
from models import load_checkpoint, resize_pos_embed, scan_orders
from pretrain.mae import MaskedAutoencoder

CLS = ["middle", "head", "double", "mean", "max"]
FOUR = ["row", "row_reverse", "col", "col_reverse"]
VARIANTS = {  # bidir_mode / scan_orders rows of the ablation
    "none": dict(bidir_mode="none"), "sequence": dict(bidir_mode="sequence"), "block": dict(bidir_mode="block"),
    "ssm": dict(bidir_mode="ssm"), "v2": dict(), "v2-4dir": dict(scan_orders=FOUR),
}


def tiny(**kw):
    kw = dict(dict(img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2, num_classes=5), **kw)
    return timm.create_model("vim_tiny_patch16_224", **kw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cls_mode", CLS)
def test_every_variant_builds_and_trains(cls_mode, variant):
    torch.manual_seed(0)
    model = tiny(cls_mode=cls_mode, drop_path_rate=0.1, **VARIANTS[variant])
    c = {"double": 2, "mean": 0, "max": 0}.get(cls_mode, 1)
    assert model.num_cls_tokens == c and model.pos_embed.shape == (1, 16 + c, 32)
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 16 + c, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 32)
    logits = model.forward_head(feats)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    model.train()
    model(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    nwd = model.no_weight_decay()
    assert {n for n, _ in model.named_parameters() if n.split(".")[-1].startswith(("A", "D"))} <= nwd
    model.eval()
    out = model(x)
    model.set_grad_checkpointing(True)
    assert torch.allclose(model(x), out, atol=1e-6)


def test_class_token_heads():
    torch.manual_seed(0)
    feats = torch.randn(2, 18, 32)
    double = tiny(cls_mode="double")
    assert torch.allclose(double.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 17]) / 2)
    head = tiny(cls_mode="head")
    assert torch.equal(head.forward_head(feats[:, :17], pre_logits=True), feats[:, 0])
    mean = tiny(cls_mode="mean")
    assert torch.allclose(mean.forward_head(feats[:, :16]), mean.head(feats[:, :16].mean(1)))
    mx = tiny(cls_mode="max")
    assert torch.allclose(mx.forward_head(feats[:, :16]), mx.head(feats[:, :16]).amax(1))
    assert torch.allclose(mx.forward_head(feats[:, :16], pre_logits=True), feats[:, :16].mean(1))
    middle = tiny()
    assert middle.cls_index == 8 and torch.equal(middle.forward_head(feats[:, :17], pre_logits=True), feats[:, 8])


def mixer_names(model, i):
    return {n.split("mixer.")[1] for n, _ in model.named_parameters() if n.startswith(f"layers.{i}.mixer.")}


def ssm_names(s=""):
    return {f"conv1d{s}.weight", f"conv1d{s}.bias", f"x_proj{s}.weight", f"dt_proj{s}.weight", f"dt_proj{s}.bias",
            f"A{s}_log", f"D{s}"}


def test_parameter_sets_of_the_bidirectional_strategies():
    shared = {"in_proj.weight", "out_proj.weight"}
    one = shared | ssm_names()
    for mode in ("none", "sequence", "block"):
        model = tiny(bidir_mode=mode)
        assert mixer_names(model, 0) == mixer_names(model, 1) == one, mode
    block = tiny(bidir_mode="block")
    assert [layer.mixer.directions for layer in block.layers] == [("row",), ("row_reverse",)]
    ssm = tiny(bidir_mode="ssm")
    assert mixer_names(ssm, 0) == one | ssm_names("_b") - {"conv1d_b.weight", "conv1d_b.bias"}
    assert mixer_names(tiny(), 0) == one | ssm_names("_b")
    four = tiny(scan_orders=FOUR)
    assert mixer_names(four, 0) == one | ssm_names("_b") | ssm_names("_col") | ssm_names("_col_b")
    assert mixer_names(tiny(scan_orders=["col"]), 0) == one       # a single SSM is unsuffixed
    for name in ("middle", "head"):
        assert tiny(cls_mode=name).cls_token.shape == (1, 1, 32)
    assert tiny(cls_mode="double").cls_token.shape == (1, 2, 32)
    assert tiny(cls_mode="mean").cls_token is None and "cls_token" not in tiny(cls_mode="max").state_dict()


VIM_T_PARAMS = {  # the README table (Vim-T at 224, 1000 classes)
    ("cls_mode", "middle"): 7_148_008, ("cls_mode", "head"): 7_148_008, ("cls_mode", "double"): 7_148_392,
    ("cls_mode", "mean"): 7_147_624, ("cls_mode", "max"): 7_147_624,
    ("bidir_mode", "none"): 6_419_944, ("bidir_mode", "sequence"): 6_419_944, ("bidir_mode", "block"): 6_419_944,
    ("bidir_mode", "ssm"): 7_101_928, ("bidir_mode", "v2"): 7_148_008,
    ("scan_orders", tuple(FOUR)): 8_604_136,
}


def test_vim_tiny_parameter_counts_of_the_readme():
    for (key, value), count in VIM_T_PARAMS.items():
        model = timm.create_model("vim_tiny_patch16_224", **{key: list(value) if key == "scan_orders" else value})
        assert sum(p.numel() for p in model.parameters()) == count, (key, value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(bidir_mode="none", scan_orders=FOUR), "need bidir_mode 'v2'"),
    (dict(bidir_mode="ssm", scan_orders=["row"]), "need bidir_mode 'v2'"),
    (dict(bidir_mode="bi"), "unknown bidir_mode"),
    (dict(cls_mode="tail"), "unknown cls_mode"),
    (dict(scan_orders=["row", "zigzag"]), "directions must be distinct names"),
    (dict(scan_orders=["row", "row"]), "directions must be distinct names"),
    (dict(scan_orders=[]), "directions must be distinct names"),
])
def test_invalid_combinations_are_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny(**kwargs)


def test_explicit_default_orders_are_accepted_by_every_mode():
    assert tiny(bidir_mode="none", scan_orders=["row", "row_reverse"]).layers[0].mixer.directions == ("row",)


def test_scan_orders_place_the_class_tokens():
    # grid 2x3; col visits raster 0 3 1 4 2 5; forward orders visit a class token at its sequence index
    assert scan_orders(["col"], (2, 3), "mean", 6).tolist() == [[0, 3, 1, 4, 2, 5]]
    assert scan_orders(["row", "col", "col_reverse"], (2, 3), "middle", 7).tolist() == [
        [0, 1, 2, 3, 4, 5, 6], [0, 4, 1, 3, 5, 2, 6], [6, 2, 5, 3, 1, 4, 0]]
    assert scan_orders(["col"], (2, 3), "head", 7).tolist() == [[0, 1, 4, 2, 5, 3, 6]]
    assert scan_orders(["col", "col_reverse"], (2, 3), "double", 8).tolist() == [
        [0, 1, 4, 2, 5, 3, 6, 7], [7, 6, 3, 5, 2, 4, 1, 0]]
    assert scan_orders(["diag"], (2, 3), "mean", 6).tolist() == [[0, 1, 3, 2, 4, 5]]
    # a subset of the grid (MAE's visible patches) keeps the full order's relative order, per sample
    ids = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])
    assert scan_orders(["col", "row_reverse"], (2, 3), "middle", 5, ids).tolist() == [
        [[0, 3, 2, 1, 4], [0, 3, 2, 1, 4]], [[4, 3, 2, 1, 0], [4, 3, 2, 1, 0]]]
    full = scan_orders(["col"], (2, 3), "middle", 7)
    assert torch.equal(scan_orders(["col"], (2, 3), "middle", 7, torch.arange(6).expand(2, 6)), full[:, None].expand(1, 2, 7))


def _permuted(model, x, order):
    """model.forward_blocks on x read in `order` (per sample: (batch, L)), returned in x's order."""
    index = order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    y = model.forward_blocks(x.gather(1, index))
    return torch.zeros_like(y).scatter(1, index, y)


@pytest.mark.parametrize("cls_mode", ["middle", "head", "mean"])
def test_a_column_scan_is_a_row_scan_of_the_column_major_sequence(cls_mode):
    torch.manual_seed(0)
    col = tiny(cls_mode=cls_mode, scan_orders=["col_reverse"]).eval()
    row = tiny(cls_mode=cls_mode, bidir_mode="none").eval()
    row.load_state_dict(col.state_dict())                    # one SSM: the same unsuffixed names
    L = col.pos_embed.shape[1]
    x = torch.randn(2, L, 32)
    order = col.scan_order_0[0].expand(2, L)
    with torch.no_grad():
        torch.testing.assert_close(col.forward_blocks(x), _permuted(row, x, order), rtol=1e-5, atol=1e-5)
        # a per-sample subset of the grid, as MAE's visible tokens
        ids = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(2)])
        c = col.num_cls_tokens
        xs = torch.randn(2, 6 + c, 32)
        order = scan_orders(["col_reverse"], (4, 4), cls_mode, 6 + c, ids)[0]
        torch.testing.assert_close(col.forward_blocks(xs, patch_ids=ids), _permuted(row, xs, order),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass patch_ids"):
        col.forward_blocks(xs)


def test_block_mode_odd_blocks_scan_backward():
    torch.manual_seed(0)
    model = tiny(bidir_mode="block")
    fwd, bwd = model.layers[0].mixer, model.layers[1].mixer
    bwd.load_state_dict(fwd.state_dict())
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(bwd(x), fwd(x.flip(1)).flip(1), rtol=1e-5, atol=1e-5)


def test_sequence_mode_reverses_whole_sequences_in_training_only():
    torch.manual_seed(0)
    model = tiny(bidir_mode="sequence")
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        model.eval()
        plain = model.forward_blocks(x)
        model.bidir_mode = "none"                                # the same blocks on the reversed sequence
        flipped = model.forward_blocks(x.flip(1)).flip(1)
        model.bidir_mode = "sequence"
        model.train()
        seen = []
        for _ in range(12):
            y = model.forward_blocks(x)
            seen.append("plain" if torch.allclose(y, plain, atol=1e-6) else
                        "flipped" if torch.allclose(y, flipped, atol=1e-6) else "other")
    assert set(seen) == {"plain", "flipped"}, seen


def test_four_directions_triton_equals_reference():
    from kernels import scan_multidir_triton as md
    if type(md._md_scan_fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("needs the Triton interpreter")
    torch.manual_seed(0)
    model = tiny(scan_orders=FOUR, cls_mode="double", embed_dim=16, depth=1, d_state=4, img_size=24)   # 3x3 grid
    x = torch.randn(2, 3, 24, 24)
    results = []
    for backend in ("reference", "triton"):
        for layer in model.layers:
            layer.mixer.scan_backend = backend
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-3, atol=1e-5 * ref_grads[name].abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cls_mode", CLS)
def test_pos_embed_resize_and_checkpoint_round_trip(cls_mode, tmp_path):
    torch.manual_seed(0)
    src = tiny(cls_mode=cls_mode, scan_orders=FOUR)
    from safetensors.torch import save_file
    path = tmp_path / "enc.safetensors"
    save_file(src.state_dict(), str(path))
    same = tiny(cls_mode=cls_mode, scan_orders=FOUR)
    assert load_checkpoint(same, path) == []
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(same(x), src(x))
    big = tiny(cls_mode=cls_mode, scan_orders=FOUR, img_size=64)       # 8x8 grid
    assert load_checkpoint(big, path) == []
    assert torch.equal(big.split_cls(big.pos_embed)[0], src.split_cls(src.pos_embed)[0])
    assert torch.equal(big.pos_embed, resize_pos_embed(src.pos_embed, (8, 8), cls_mode=cls_mode))
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    # the class slots never leak into the interpolated grid
    pos = torch.randn(1, 16 + src.num_cls_tokens, 4)
    slots = list(src.cls_positions(16))
    pos[:, slots] = 1000.0
    new = resize_pos_embed(pos, (8, 8), cls_mode=cls_mode)
    assert (new[:, list(big.cls_positions(64))] == 1000.0).all()
    assert big.split_cls(new)[1].abs().max() < 100.0


@pytest.mark.parametrize("cls_mode", CLS)
@pytest.mark.parametrize("mask_mode", ["drop", "keep"])
def test_mae_with_every_class_token_strategy(cls_mode, mask_mode):
    torch.manual_seed(0)
    enc = tiny(cls_mode=cls_mode, scan_orders=FOUR, num_classes=0)
    mae = MaskedAutoencoder(enc, {}, mask_mode=mask_mode, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                            vis_images=torch.randn(2, 3, 32, 32))
    assert mae.decoder_pos_embed.shape == (1, 16 + enc.num_cls_tokens, 16)
    loss, _ = mae({"image": torch.randn(3, 3, 32, 32)})
    loss.backward()
    assert not [n for n, p in mae.named_parameters() if p.grad is None]
    masked, recon = mae.reconstruct(mae.vis_images, torch.Generator().manual_seed(0))
    keep = masked != 0
    assert torch.allclose(recon[keep], mae.vis_images[keep], atol=1e-5)


@pytest.mark.parametrize("variant", ["none", "sequence", "block", "ssm"])
def test_mae_with_every_bidirectional_strategy(variant):
    enc = tiny(num_classes=0, **VARIANTS[variant])
    mae = MaskedAutoencoder(enc, {}, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, decoder="vim")
    mae.train()
    loss, _ = mae({"image": torch.randn(2, 3, 32, 32)})
    loss.backward()
    assert not [n for n, p in mae.named_parameters() if p.grad is None]


def test_config_overrides_and_export_adoption(tmp_path):
    cfg = load_config(None, ["model.cls_mode=mean", "model.scan_orders=[row,row_reverse,col,col_reverse]"])
    assert cfg.model.kwargs() == {"cls_mode": "mean", "scan_orders": FOUR}
    export = tmp_path / "encoder.safetensors"
    export.with_suffix(".json").write_text(json.dumps({"name": "vim_tiny_patch16_224", "kwargs": cfg.model.kwargs()}))
    fresh = load_config(None, ["model.depth=2"])
    adopt_export_design(fresh, str(export), is_main=False)
    assert (fresh.model.cls_mode, fresh.model.bidir_mode, fresh.model.scan_orders) == ("mean", None, FOUR)
    clash = load_config(None, ["model.cls_mode=middle"])
    with pytest.raises(ValueError, match="model.cls_mode=middle but the encoder"):
        adopt_export_design(clash, str(export), is_main=False)
    default_export = tmp_path / "default.safetensors"
    default_export.with_suffix(".json").write_text(json.dumps({"name": "vim_tiny_patch16_224", "kwargs": {}}))
    adopt_export_design(load_config(None, ["model.bidir_mode=v2"]), str(default_export), is_main=False)
    with pytest.raises(ValueError, match="bidir_mode=none but"):
        adopt_export_design(load_config(None, ["model.bidir_mode=none"]), str(default_export), is_main=False)
    adopt_export_design(load_config(None, []), str(tmp_path / "public.pth"), is_main=False)   # no json: no-op
