"""Fine-tuning tasks on CPU: classification, linear probe, public checkpoints, layer decay, EMA, ImageNet eval."""
import json

import pytest
import timm
import torch

import models
import run_finetune
from engine.optim import build_param_groups
from finetune import Classifier
from helpers import TINY_MODEL, read_losses, run_ranks

FT_TINY = TINY_MODEL + ["optim.lr=3e-3", "optim.warmup_steps=0", "optim.betas=[0.9,0.999]"]


def ft_args(task, tmp_path, cache, *extra):
    return ["--task", task, *FT_TINY, f"output_dir={tmp_path}", f"data.cache_dir={cache}", *extra]


def test_classification_from_scratch_loss_falls(tmp_path, default_data_cache):
    run_finetune.main(ft_args("classification", tmp_path, default_data_cache, "train.max_steps=12",
                              "data.batch_size=32"))
    losses = read_losses(tmp_path)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), losses


def test_classification_with_mixup_ema_reports(tmp_path, default_data_cache):
    results = run_finetune.main(ft_args("classification", tmp_path, default_data_cache, "train.max_steps=3",
                                        "finetune.ema=true", "finetune.ema_decay=0.9", "augment.mixup=0.8",
                                        "augment.cutmix=1.0", "augment.smoothing=0.1",
                                        "augment.auto_augment=rand-m9-mstd0.5-inc1", "augment.re_prob=0.25"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"top1", "top5", "ema_top1", "ema_top5"} <= set(saved)
    assert saved["top1"] == results["top1"] and 0 <= saved["top1"] <= 100
    assert (tmp_path / "best_encoder.safetensors").is_file()


def test_linprobe_leaves_the_encoder_unchanged(tmp_path, default_data_cache, monkeypatch):
    encoder = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=2,
                                num_classes=0)
    from safetensors.torch import save_file
    save_file(encoder.state_dict(), str(tmp_path / "enc.safetensors"))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    args = ft_args("linprobe", tmp_path / "run", default_data_cache, "train.max_steps=6", "optim.name=lars",
                   "optim.lr=0.1", "optim.weight_decay=0", "train.clip_grad=0")
    from finetune.linprobe import LinearProbe
    seen = {}
    original = LinearProbe.__init__

    def spy(self, enc, *a, **k):
        original(self, enc, *a, **k)
        seen["encoder"] = enc
    monkeypatch.setattr(LinearProbe, "__init__", spy)
    run_finetune.main([*args, "--pretrained", str(tmp_path / "enc.safetensors")])
    after = seen["encoder"].state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
    assert all(not p.requires_grad for p in seen["encoder"].parameters())
    assert read_losses(tmp_path / "run")


def test_linprobe_on_cached_features(tmp_path, default_data_cache):
    results = run_finetune.main(ft_args("linprobe", tmp_path, default_data_cache, "finetune.cache_features=true",
                                        "train.epochs=2", "data.batch_size=64", "optim.name=lars", "optim.lr=0.5",
                                        "optim.weight_decay=0", "train.clip_grad=0"))
    assert results["top1"] > 100 / 8   # better than chance on 8 shapes, even with a random encoder
    assert len(read_losses(tmp_path)) == 2 * (5000 // 64)


def test_public_checkpoint_fine_tunes(tmp_path, default_data_cache):
    from test_models import public_shapes
    torch.manual_seed(0)
    state = {k: 0.02 * torch.randn(s) for k, s in public_shapes(32, depth=2, M=16).items()}
    for i in range(2):   # a sane SSM: the scan's A = -exp(A_log) must stay negative-definite and stable
        for p in ("A_log", "A_b_log"):
            state[f"layers.{i}.mixer.{p}"] = torch.log(torch.arange(1, 17.0)).repeat(64, 1)
    state["patch_embed.proj.weight"] = 0.02 * torch.randn(32, 3, 8, 8)
    torch.save({"model": state}, tmp_path / "public.pth")
    run_finetune.main(ft_args("classification", tmp_path / "run", default_data_cache, "train.max_steps=3",
                              "--pretrained", str(tmp_path / "public.pth")))
    assert len(read_losses(tmp_path / "run")) == 3


def test_wrong_number_of_classes_is_an_error(tmp_path, default_data_cache):
    with pytest.raises(ValueError, match="head has 10 outputs but the data has 8 classes"):
        run_finetune.main(ft_args("classification", tmp_path, default_data_cache, "model.num_classes=10"))
    with pytest.raises(ValueError, match="--task imagenet needs 1000 classes"):
        run_finetune.main(ft_args("imagenet", tmp_path, default_data_cache, "data.train_shards=", "data.eval_shards="))


def test_layer_decay_groups_carry_the_right_scales():
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=3,
                              num_classes=5)
    task = Classifier(model, 5, {})
    groups = build_param_groups(task, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for g in groups:
        for p in g["params"]:
            scale_of[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(task.named_parameters())
    assert scale_of[id(named["model.pos_embed"])] == (0.5 ** 4, 0.0)          # stem: layer id 0 of 4
    assert scale_of[id(named["model.layers.0.mixer.in_proj.weight"])] == (0.5 ** 3, 0.05)
    assert scale_of[id(named["model.layers.2.mixer.A_log"])] == (0.5 ** 1, 0.0)   # no decay on A_log
    assert scale_of[id(named["model.head.weight"])] == (1.0, 0.05)


def test_ema_updates_towards_the_model():
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=1,
                              num_classes=3)
    task = Classifier(model, 3, {}, ema_decay=0.5)
    task({"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([0, 1])})
    start = task.ema.module.head.weight.clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    task.on_step_end()
    assert torch.allclose(task.ema.module.head.weight, start + 0.5)
    state = task.extra_state()
    other = Classifier(model, 3, {}, ema_decay=0.5)
    other.load_extra_state(state)
    assert torch.equal(other.ema.module.head.weight, task.ema.module.head.weight)


def test_imagenet_sample_eval_with_1000_class_head(tmp_path, shared_data):
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", depth=1, embed_dim=32)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "vim.safetensors"))
    shard = shared_data / "imagenet-sample" / "imagenet-sample-000000.tar.gz"
    results = run_finetune.main([
        "--task", "imagenet", "--eval-only", "--pretrained", str(tmp_path / "vim.safetensors"),
        "model.depth=1", "model.embed_dim=32", f"data.train_shards={shard}", f"data.eval_shards={shard}",
        "data.train_samples=1000", "data.eval_samples=1000", "data.batch_size=100", "data.num_workers=1",
        f"output_dir={tmp_path / 'eval'}"])
    assert {"top1", "top5"} <= set(results)
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["top5"] == results["top5"]


def test_classification_on_cifar10_shards(tmp_path, shared_data):
    train = shared_data / "cifar10" / "cifar10-train-{000000..000009}.tar.gz"
    val = shared_data / "cifar10" / "cifar10-val-000000.tar.gz"
    run_finetune.main(["--task", "classification", *FT_TINY, f"output_dir={tmp_path}", f"data.train_shards={train}",
                       f"data.eval_shards={val}", "data.train_samples=50000", "data.eval_samples=5000",
                       "data.num_classes=10", "data.batch_size=64", "train.max_steps=12", "data.num_workers=1"])
    losses = read_losses(tmp_path)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), losses
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["top1"] <= results["top5"] <= 100


def test_two_gloo_ranks_zero3_with_evaluation(tmp_path, default_data_cache):
    run_ranks(["run_finetune.py", *ft_args("classification", tmp_path, default_data_cache, "train.max_steps=3",
                                           "deepspeed=configs/deepspeed/zero3.json")], world_size=2)
    assert sorted(read_losses(tmp_path)) == [1, 2, 3]
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["top1"] <= results["top5"] <= 100
    assert (tmp_path / "encoder.safetensors").is_file()
