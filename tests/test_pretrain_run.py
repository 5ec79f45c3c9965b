"""End-to-end pretraining runs on CPU under DeepSpeed: losses fall, resume is exact, bad input is refused."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import run_pretrain
from engine.checkpoint import COMPLETE, latest_checkpoint
from engine.config import ConfigError
from engine.train import NonFiniteLossError
from helpers import TINY_MODEL, read_losses, run_ranks

MAE_TINY = TINY_MODEL + ["mae.decoder_embed_dim=16", "mae.decoder_depth=1", "mae.decoder_num_heads=2",
                         "mae.num_vis=4", "optim.lr=3e-3", "optim.warmup_steps=0", "optim.warmup_epochs=0"]


def mae_args(tmp_path, cache, *extra):
    return ["--objective", "mae", *MAE_TINY, f"output_dir={tmp_path}", f"data.cache_dir={cache}", *extra]


@pytest.mark.parametrize("zero", [0, 2])
def test_mae_run_loss_falls_and_writes_outputs(tmp_path, default_data_cache, zero):
    run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.max_steps=8",
                               f"deepspeed=configs/deepspeed/zero{zero}.json"))
    losses = read_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    first, last = [losses[s] for s in (1, 2)], [losses[s] for s in (7, 8)]
    assert sum(last) < sum(first), losses
    for name in ("config.yaml", "loss_curve.png", "encoder.safetensors", "encoder.json", "reconstruction_step00000008.png"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").iterdir())
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "images_per_s", "skipped_samples"} <= set(record)
    assert latest_checkpoint(tmp_path).name == "step_00000008"


def test_resume_gives_the_same_losses(tmp_path, default_data_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train.epochs=2", "data.batch_size=32", "train.save_every=3", "augment.scale_min=0.3"]
    run_pretrain.main(mae_args(straight, default_data_cache, *common, "train.max_steps=12"))
    run_pretrain.main(mae_args(resumed, default_data_cache, *common, "train.max_steps=6"))
    run_pretrain.main(mae_args(resumed, default_data_cache, *common, "train.max_steps=12", "train.resume=auto"))
    a, b = read_losses(straight), read_losses(resumed)
    assert sorted(b) == list(range(1, 13))
    for step in range(1, 13):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_grad_checkpointing_gives_the_same_losses(tmp_path, default_data_cache, monkeypatch):
    """train.grad_checkpointing recomputes the encoder's blocks in the backward (counted) without changing a loss."""
    import models.vim
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    checkpoint = models.vim.checkpoint
    monkeypatch.setattr(models.vim, "checkpoint", counted)
    run_pretrain.main(mae_args(tmp_path / "plain", default_data_cache, "train.max_steps=3"))
    assert not calls
    run_pretrain.main(mae_args(tmp_path / "ckpt", default_data_cache, "train.max_steps=3",
                               "train.grad_checkpointing=true"))
    assert len(calls) == 3 * 2  # 3 steps x 2 blocks
    assert read_losses(tmp_path / "plain") == read_losses(tmp_path / "ckpt")


def test_interrupted_checkpoint_is_not_the_latest(tmp_path, default_data_cache):
    run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.max_steps=2"))
    half_written = tmp_path / "checkpoints" / "step_00000099"
    half_written.mkdir()
    (half_written / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.max_steps=3"))   # resumes from step 2
    assert sorted(read_losses(tmp_path)) == [1, 2, 3]


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path, default_data_cache, monkeypatch):
    run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.max_steps=2"))
    from pretrain.mae import MaskedAutoencoder
    original = MaskedAutoencoder.forward_loss
    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.max_steps=6", "train.max_bad_steps=3"))
    assert (tmp_path / "checkpoints" / "step_00000002" / COMPLETE).is_file()


def test_bad_config_key_is_rejected(tmp_path, default_data_cache):
    with pytest.raises(ConfigError, match="mae.mask_ration"):
        run_pretrain.main(mae_args(tmp_path, default_data_cache, "mae.mask_ration=0.5"))


@pytest.mark.parametrize("zero", [0, 2])
def test_two_gloo_ranks(tmp_path, default_data_cache, zero):
    args = ["run_pretrain.py", *mae_args(tmp_path, default_data_cache, "train.max_steps=8",
                                        f"deepspeed=configs/deepspeed/zero{zero}.json", "data.batch_size=8")]
    outputs = run_ranks(args, world_size=2)
    assert "global batch 16 (2 ranks" in outputs[0]
    losses = read_losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (7, 8)) < sum(losses[s] for s in (1, 2)), losses
    assert (tmp_path / "encoder.safetensors").is_file()


def test_sigterm_saves_a_checkpoint_and_the_export(tmp_path, default_data_cache):
    import signal
    import subprocess
    import sys
    import time
    from helpers import ROOT
    import os
    # a fresh single process: none of the rendezvous variables this pytest process may have set
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    args = mae_args(tmp_path, default_data_cache, "train.epochs=50", "data.num_workers=2")
    proc = subprocess.Popen([sys.executable, "run_pretrain.py", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)   # the whole group, DataLoader workers included, as `timeout` and schedulers do
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True and results["step"] >= 1
    assert latest_checkpoint(tmp_path).name == f"step_{results['step']:08d}"
    assert (tmp_path / "encoder.safetensors").is_file()


@pytest.mark.parametrize("error", [RuntimeError("DataLoader worker (pid 1) is killed by signal"),
                                   ConnectionResetError(104, "Connection reset by peer")])
def test_a_loader_killed_with_the_run_ends_the_epoch_only_after_sigterm(error):
    from engine.train import _batches

    def loader():
        yield "batch 0"
        raise error

    assert list(_batches(loader(), terminated=[15])) == ["batch 0"]
    with pytest.raises(type(error)):
        list(_batches(loader(), terminated=[]))


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_checkpoint_of_four_ranks_resumes_on_two_and_on_one(tmp_path, default_data_cache, zero):
    args = ["run_pretrain.py", *mae_args(tmp_path, default_data_cache, "data.batch_size=8",
                                        f"deepspeed=configs/deepspeed/zero{zero}.json")]
    run_ranks([*args, "train.max_steps=3"], world_size=4)
    exported = load_file(tmp_path / "encoder.safetensors")
    for ranks in (2, 1):  # the 4-rank checkpoint loaded on fewer ranks without training exports the same encoder
        copy = tmp_path.parent / f"{tmp_path.name}_on{ranks}"
        shutil.copytree(tmp_path, copy)
        run_ranks([*args, "train.max_steps=3", f"output_dir={copy}"], world_size=ranks)
        again = load_file(copy / "encoder.safetensors")
        assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in exported)
    # ZeRO-1..3 resume on another number of ranks through DeepSpeed's universal checkpoint; ZeRO-0 saves the whole
    # optimizer state and loads it directly
    run_ranks([*args, "train.max_steps=5"], world_size=2)
    outputs = run_ranks([*args, "train.max_steps=7"], world_size=1)
    assert "resumed from" in outputs[0]
    assert ("step_00000005_universal" in outputs[0]) == (zero > 0)
    losses = read_losses(tmp_path)
    assert sorted(losses) == list(range(1, 8))
    assert all(abs(v) < 10 for v in losses.values())
    assert latest_checkpoint(tmp_path).name == "step_00000007"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, default_data_cache, capsys):
    run_pretrain.main(mae_args(tmp_path, default_data_cache, "train.grad_accum=2", "train.max_steps=3",
                               "train.epochs=2"))
    out = capsys.readouterr().out
    assert "global batch 32 (1 ranks x 16 x 2 accum)" in out
    assert "156 steps/epoch" in out   # 5,000 samples: 312 micro-batches of 16, two per optimizer step
    assert sorted(read_losses(tmp_path)) == [1, 2, 3]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
