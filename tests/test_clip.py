"""CLIP objective: the loss against a direct computation, 2-rank equivalence, a short run, zero-shot, tokenizer."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401
import run_pretrain
from helpers import ROOT, TINY_MODEL, free_port, read_losses
from pretrain.clip import ClipLoss, ClipModel, Tokenizer, build_text_tower

CLIP_TINY = TINY_MODEL + ["clip.embed_dim=16", "clip.context_length=16", "clip.text_width=32", "clip.text_heads=2",
                          "clip.text_layers=1", "optim.lr=2e-3", "optim.warmup_steps=0", "clip.zeroshot_templates=simple"]


def test_loss_equals_direct_computation():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss = ClipLoss()(img, txt, scale)
    logits = scale * img @ txt.t()
    direct = 0.0
    for i in range(6):   # -log softmax of the matching pair, rows (image->text) and columns (text->image)
        direct += -logits[i, i] + torch.logsumexp(logits[i], 0)
        direct += -logits[i, i] + torch.logsumexp(logits[:, i], 0)
    assert loss.item() == pytest.approx((direct / 12).item(), rel=1e-6)


TWO_RANK_SCRIPT = """
import os, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from pretrain.clip import ClipLoss
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
g = torch.Generator().manual_seed(0)
w_img, w_txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
x_img, x_txt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
scale = torch.tensor(7.0, requires_grad=True)
def run(xi, xt, loss_fn):
    wi, wt = w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()
    s = scale.detach().clone().requires_grad_()
    loss = loss_fn(F.normalize(xi @ wi, dim=-1), F.normalize(xt @ wt, dim=-1), s)
    loss.backward()
    return loss.detach(), [wi.grad, wt.grad, s.grad]
full_loss, full_grads = run(x_img, x_txt, ClipLoss())
half = slice(4 * rank, 4 * rank + 4)
loss, grads = run(x_img[half], x_txt[half], ClipLoss(rank, world))
torch.distributed.all_reduce(loss); loss /= world              # the mean over ranks
for grad in grads:                                              # what DeepSpeed's averaging does
    torch.distributed.all_reduce(grad); grad /= world
assert torch.allclose(loss, full_loss, atol=1e-6), (loss, full_loss)
for a, b in zip(grads, full_grads):
    assert torch.allclose(a, b, atol=1e-6), (a, b)
torch.distributed.destroy_process_group()
print("ok", rank)
"""


def test_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT.format(root=str(ROOT)))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0].strip().endswith("ok 0") and outs[1].strip().endswith("ok 1")


def test_tokenizer_works_offline():
    tok = Tokenizer(context_length=16)
    tokens = tok(["a small red triangle", "a photo of a dog."])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert tok("a small red triangle").shape == (16,)
    assert torch.equal(tok("a small red triangle"), tokens[0])
    assert tokens[0, 0] == tokens[1, 0] and (tokens[0] > 0).sum() > 3   # start token, then words


def tiny_clip(classnames):
    encoder = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, embed_dim=32, depth=1,
                                num_classes=0)
    text = build_text_tower(16, context_length=16, width=32, heads=2, layers=1)
    return ClipModel(encoder, text, 16, {}, classnames=classnames, templates=(lambda c: f"a {c}.",),
                     tokenizer=Tokenizer(16))


def test_zero_shot_on_a_tiny_synthetic_set(monkeypatch):
    torch.manual_seed(0)
    model = tiny_clip(["circle", "square", "star"]).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    # an image tower that returns exactly each class's text embedding: zero-shot must then be perfect
    weights = model.zeroshot_weights()
    monkeypatch.setattr(model, "encode_image", lambda imgs, normalize=True: weights.t()[labels])
    with torch.no_grad():
        out = model.evaluate_batch({"image": images, "label": labels})
    assert out["zeroshot_top1"] == (100.0 * 6, 6)
    assert out["zeroshot_top5"] == (100.0 * 6, 6)


def test_logit_scale_init_and_clamp():
    model = tiny_clip(None)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)


def test_clip_run_loss_falls_with_zero_shot(tmp_path, default_data_cache):
    results = run_pretrain.main(["--objective", "clip", *CLIP_TINY, f"output_dir={tmp_path}",
                                 f"data.cache_dir={default_data_cache}", "train.max_steps=12", "data.batch_size=32"])
    losses = read_losses(tmp_path)
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)), losses
    assert 0.0 <= results["zeroshot_top1"] <= results["zeroshot_top5"] <= 100.0
    assert (tmp_path / "encoder.safetensors").is_file()


def test_clip_resume_gives_the_same_losses(tmp_path, default_data_cache):
    common = ["--objective", "clip", *CLIP_TINY, f"data.cache_dir={default_data_cache}", "train.save_every=3",
              "data.batch_size=16", "train.eval_every=0"]
    run_pretrain.main([*common, f"output_dir={tmp_path / 'a'}", "train.max_steps=6"])
    run_pretrain.main([*common, f"output_dir={tmp_path / 'b'}", "train.max_steps=3"])
    run_pretrain.main([*common, f"output_dir={tmp_path / 'b'}", "train.max_steps=6"])
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), (step, a, b)
