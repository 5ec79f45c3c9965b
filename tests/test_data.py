"""data/: shard writing, rank/worker splitting, corrupt input, resume, default data set (CPU, offline)."""
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_loader, build_transform, default_dataset, read_info
from data.make_shards import caption_items, convert, imagefolder_items
from data.make_shards import main as make_shards_main
from data.writer import write_info, write_shard
from data.shards import count_samples, expand_urls
from data.synthetic import render

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"
CLASSES = ["cat", "dog", "emu"]


def _image_bytes(seed: int, fmt: str, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageFolder: 3 classes x 5 images (jpg and png) + one corrupt file; converted to 4 shards."""
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(5):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            (root / name / f"img{i}.{ext}").write_bytes(_image_bytes(10 * c + i, fmt))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path_factory.mktemp("folder_shards")
    info = make_shards_main(["--imagefolder", str(root), "--out", str(out), "--samples-per-shard", "4",
                             "--prefix", "train", "--workers", "2"])
    return {"root": root, "out": out, "info": info, "urls": str(out / "train-{000000..000003}.tar")}


def _read(urls, *, world_size=1, num_workers=2, batch_size=2, fields=("key", "label", "image"), **kw):
    """All batches of one epoch over simulated ranks: {rank: [batch, ...]} and their skipped() counts."""
    batches, skipped = {}, {}
    for rank in range(world_size):
        info = build_loader(urls, fields=fields, batch_size=batch_size, num_workers=num_workers, rank=rank,
                            world_size=world_size, **kw)
        info.set_epoch(0)
        batches[rank] = list(info.loader)
        assert len(batches[rank]) == info.steps_per_epoch or not kw.get("is_training", True)
        skipped[rank] = info.skipped()
    return batches, skipped


def _keys(batches):
    return [k for bs in batches.values() for b in bs for k in b["key"]]


def test_imagefolder_shards_written(folder):
    info, out = folder["info"], folder["out"]
    assert info["num_samples"] == 15 and info["skipped"] == 1 and info["classes"] == CLASSES
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    assert sorted(info["shards"]) == [f"train-{i:06d}.tar" for i in range(4)]
    members = [m for name in info["shards"] for m in tarfile.open(out / name).getnames()]
    assert all(m.count(".") == 1 for m in members)  # keys contain no '.'
    assert {m.split(".")[1] for m in members} == {"jpg", "png", "cls", "json"}  # png stored as png
    paths = []
    for name in info["shards"]:
        with tarfile.open(out / name) as tar:
            paths += [json.load(tar.extractfile(m))["path"] for m in tar if m.name.endswith(".json")]
    assert len(paths) == 15 and not any("broken" in p for p in paths)


def test_make_shards_resumes(folder, tmp_path):
    out = tmp_path / "resume"
    make_shards_main(["--imagefolder", str(folder["root"]), "--out", str(out), "--samples-per-shard", "4",
                      "--workers", "1"])
    kept, redo = out / "shard-000000.tar", out / "shard-000002.tar"
    before = kept.stat().st_mtime_ns
    redo.unlink()
    info = make_shards_main(["--imagefolder", str(folder["root"]), "--out", str(out), "--samples-per-shard", "4",
                             "--workers", "1"])
    assert kept.stat().st_mtime_ns == before and redo.exists()
    assert info["num_samples"] == 15 and info["skipped"] == 1
    assert redo.read_bytes() == (folder["out"] / "train-000002.tar").read_bytes()  # deterministic bytes


def test_make_shards_resize_and_size_cap(folder, tmp_path):
    items, classes = imagefolder_items(str(folder["root"]))
    info = convert(items[:5], classes, str(tmp_path), resize_short=8, max_shard_bytes=12 * 1024, progress=False)
    assert list(info["shards"].values()) == [2, 2, 1]  # each sample counts its file size + ~4 KiB of headers
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        image = next(m for m in tar if m.name.endswith(".jpg"))  # re-encoded: png sources become jpg too
        assert Image.open(tar.extractfile(image)).size == (8, 8)


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_sample_once(folder, world_size):
    urls = folder["urls"]
    all_keys = set(_keys(_read(urls, num_workers=0, batch_size=15, is_training=False)[0]))
    assert len(all_keys) == 15

    batches, _ = _read(urls, world_size=world_size, is_training=False)  # eval: all, once, partial batch kept
    keys = _keys(batches)
    assert sorted(keys) == sorted(all_keys)

    batches, _ = _read(urls, world_size=world_size, batch_size=3 if world_size == 1 else 2)
    keys = _keys(batches)  # train: lockstep batch count, the < 1 global batch remainder is not read
    assert len(keys) == len(set(keys)) == {1: 15, 2: 12}[world_size]
    assert set(keys) <= all_keys
    assert len({len(bs) for bs in batches.values()}) == 1
    labels = torch.cat([b["label"] for bs in batches.values() for b in bs])
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2}
    assert batches[0][0]["image"].shape == (batches[0][0]["label"].shape[0], 3, 16, 16)


def test_shuffle_changes_with_epoch(folder):
    info = build_loader(folder["urls"], fields=("key",), batch_size=5, num_workers=0, shuffle_buffer=4)
    orders = []
    for epoch in (0, 1, 0):
        info.set_epoch(epoch)
        orders.append([k for b in info.loader for k in b["key"]])
    assert orders[0] == orders[2] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_epoch_position_rules(folder):
    info = build_loader(folder["urls"], fields=("key",), batch_size=5, num_workers=0)
    info.set_epoch(0)
    full = [b["key"] for b in info.loader]
    info.set_epoch(0)  # set_epoch always starts the epoch over ...
    assert [b["key"] for b in info.loader] == full
    state = info.state_dict()
    assert state["batches_done"] == 3
    fresh = build_loader(folder["urls"], fields=("key",), batch_size=5, num_workers=0)
    fresh.load_state_dict(state)
    fresh.set_epoch(0)  # ... except after restoring a position: here the end of the epoch, so nothing is left
    assert list(fresh.loader) == []
    fresh.set_epoch(1)
    assert len(list(fresh.loader)) == 3


def test_pipe_urls(folder):
    urls = [f"pipe:cat {folder['out']}/train-{i:06d}.tar" for i in range(4)]  # streamed, no info.json
    batches, _ = _read(urls, num_workers=0, batch_size=4, is_training=False, num_samples=15)
    assert len(set(_keys(batches))) == 15


def test_fewer_shards_than_streams(folder, tmp_path):
    # one shard for 2 ranks x 2 workers: split at sample level, nothing duplicated, no rank left idle
    convert(*imagefolder_items(str(folder["root"])), str(tmp_path), samples_per_shard=100, progress=False)
    urls = str(tmp_path / "shard-000000.tar")
    batches, _ = _read(urls, world_size=2, is_training=False)
    assert len(_keys(batches)) == len(set(_keys(batches))) == 15
    batches, _ = _read(urls, world_size=2, batch_size=3)
    assert len(_keys(batches)) == len(set(_keys(batches))) == 12
    assert [len(bs) for bs in batches.values()] == [2, 2]


def test_caption_shards(tmp_path):
    rows = []
    for i in range(6):
        (tmp_path / f"p{i}.jpg").write_bytes(_image_bytes(i, "JPEG"))
        row = {"image": f"p{i}.jpg", "caption": f"caption number {i}"}
        if i % 2:
            row["label"] = "odd"
        rows.append(row)
    rows[5]["image"] = str(tmp_path / "p5.jpg")  # absolute paths work too
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    info = convert(*caption_items(str(tmp_path / "list.jsonl")), str(out), samples_per_shard=3, progress=False)
    assert info["num_samples"] == 6 and info["classes"] == ["odd"]
    with tarfile.open(out / "shard-000001.tar") as tar:
        assert sorted(tar.getnames()) == ["00000003.cls", "00000003.jpg", "00000003.json", "00000003.txt",
                                          "00000004.jpg", "00000004.json", "00000004.txt",
                                          "00000005.cls", "00000005.jpg", "00000005.json", "00000005.txt"]
    urls = str(out / "shard-{000000..000001}.tar")
    batches, _ = _read(urls, world_size=2, fields=("image", "text"), is_training=False)
    texts = [t for bs in batches.values() for b in bs for t in b["text"]]
    assert sorted(texts) == [f"caption number {i}" for i in range(6)]
    info = build_loader(urls, fields=("text",), batch_size=3, num_workers=0,
                        text_transform=lambda s: torch.tensor([len(s), ord(s[-1])]))
    batch = next(iter(info.loader))
    assert batch["text"].shape == (3, 2)


def _write(path, samples, classes=None):
    """A shard with hand-made samples, plus its info.json."""
    count = write_shard(str(path), samples)
    write_info(str(path.parent), {path.name: count}, classes)


def _good(i):
    return f"s{i:03d}", {"jpg": _image_bytes(i, "JPEG"), "cls": str(i % 3).encode()}


def test_corrupt_sample_skipped_and_counted(tmp_path):
    samples = [_good(i) for i in range(8)]
    samples[3] = ("s003", {"jpg": b"\xff\xd8\xff\xdb" + b"\x00" * 50, "cls": b"1"})  # bad JPEG bytes
    _write(tmp_path / "c-000000.tar", samples)
    urls = str(tmp_path / "c-000000.tar")
    batches, skipped = _read(urls, num_workers=0, batch_size=3, is_training=False)
    assert sorted(_keys(batches)) == [f"s{i:03d}" for i in range(8) if i != 3] and skipped[0] == 1
    batches, skipped = _read(urls, num_workers=2, batch_size=4)  # train: the slot is refilled, size kept
    assert [len(b["key"]) for b in batches[0]] == [4, 4] and skipped[0] == 1


def test_truncated_shard_does_not_crash(tmp_path):
    counts = {name: write_shard(str(tmp_path / name), [_good(i) for i in range(lo, lo + 8)])
              for name, lo in (("t-000000.tar", 0), ("u-000000.tar", 8))}
    write_info(str(tmp_path), counts, None)
    path = tmp_path / "t-000000.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 700])  # cut mid-member; info.json says 8
    urls = str(tmp_path / "t-000000.tar") + "::" + str(tmp_path / "u-000000.tar")
    info = build_loader(urls, fields=("key", "image"), batch_size=4, num_workers=0, num_samples=16)
    keys = [k for b in info.loader for k in b["key"]]
    assert len(keys) == 16 and info.skipped() >= 1  # lockstep: lost samples are made up by repeats
    batches, skipped = _read(urls, num_workers=2, batch_size=4, num_samples=16, is_training=False)
    assert 8 <= len(_keys(batches)) < 16 and sum(skipped.values()) >= 1


def test_pickle_members_never_decoded(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    key, members = _good(0)
    members["pyd"], members["pth"] = pickle.dumps(Payload()), pickle.dumps(Payload())
    _write(tmp_path / "p-000000.tar", [(key, members), _good(1)])
    for is_training in (True, False):
        batches, skipped = _read(str(tmp_path / "p-000000.tar"), num_workers=0, batch_size=2,
                                 is_training=is_training)
        assert len(_keys(batches)) == 2 and skipped[0] == 0
    assert not marker.exists()


def test_sizes_need_info_or_num_samples(tmp_path):
    write_shard(str(tmp_path / "n-000000.tar"), [_good(i) for i in range(4)])
    with pytest.raises(ValueError, match="data.train_samples"):
        build_loader(str(tmp_path / "n-000000.tar"), fields=("image",), batch_size=2)
    info = build_loader(str(tmp_path / "n-000000.tar"), fields=("image",), batch_size=2, num_samples=4,
                        num_workers=0)
    assert info.steps_per_epoch == 2 and len(list(info.loader)) == 2


def test_resampled_fixed_epoch(folder):
    info = build_loader(folder["urls"], fields=("key",), batch_size=2, num_workers=2, resampled=True,
                        num_samples=40, world_size=2, rank=1)
    assert info.steps_per_epoch == 10 and len(list(info.loader)) == 10


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    return default_dataset(str(tmp_path_factory.mktemp("cache")))


def test_default_dataset(default_data, tmp_path_factory):
    d = default_data
    assert (d["train_samples"], d["eval_samples"], d["num_classes"]) == (5000, 1000, 8)
    assert d["classes"][:3] == ["circle", "square", "triangle"]
    assert read_info(d["train"])["num_samples"] == 5000 and read_info(d["eval"])["classes"] == d["classes"]
    info = build_loader(d["eval"], fields=("image", "label", "text"), batch_size=100, num_workers=0,
                        is_training=False, transform=build_transform(False, 32, crop_pct=1.0))
    assert info.num_samples == 1000 and info.classes == d["classes"]
    batch = next(iter(info.loader))
    assert batch["image"].shape == (100, 3, 32, 32)
    assert all(d["classes"][label] in text for label, text in zip(batch["label"].tolist(), batch["text"]))
    assert len(set(batch["label"].tolist())) == 8
    assert render(0, 5)[0].tobytes() == render(0, 5)[0].tobytes() != render(1, 5)[0].tobytes()
    again = default_dataset(os.path.dirname(os.path.dirname(os.path.dirname(d["train"]))))  # cached
    assert again == d


def _loader(urls, num_workers, repeated_aug=1):
    """A fresh loader with every kind of random augmentation (crop, flip, RandAugment, erasing)."""
    transform = build_transform(True, 32, scale=(0.2, 1.0), auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    return build_loader(urls, fields=("image", "label"), batch_size=16, num_workers=num_workers,
                        transform=transform, seed=3, num_samples=192, shuffle_buffer=50, repeated_aug=repeated_aug)


@pytest.mark.parametrize("num_workers, repeated_aug", [(0, 1), (2, 1), (2, 4)])
def test_resume_continues_exactly(default_data, num_workers, repeated_aug):
    urls = default_data["train"].replace("{000000..000009}", "{000000..000001}")  # 2 shards, 1000 samples
    info = _loader(urls, num_workers, repeated_aug)
    reference = []
    for epoch in (0, 1):
        info.set_epoch(epoch)
        reference += [(epoch, b) for b in info.loader]
    steps = info.steps_per_epoch
    assert steps == 12 and len(reference) == 24

    for stop in (5, steps + 3):  # mid-epoch, and after an epoch boundary
        interrupted, seen = _loader(urls, num_workers, repeated_aug), 0
        for epoch in (0, 1):
            interrupted.set_epoch(epoch)
            for _ in interrupted.loader:
                seen += 1
                if seen == stop:
                    break
            if seen == stop:
                break
        state = interrupted.state_dict()
        assert state["epoch"] == stop // steps and state["batches_done"] == stop % steps

        resumed = _loader(urls, num_workers, repeated_aug)
        resumed.load_state_dict(state)
        got = []
        for epoch in range(state["epoch"], 2):
            resumed.set_epoch(epoch)
            got += list(resumed.loader)
        assert len(got) == len(reference) - stop
        for (epoch, want), have in zip(reference[stop:], got):
            assert torch.equal(want["image"], have["image"]) and torch.equal(want["label"], have["label"])


def test_repeated_augmentation(default_data):
    """Each image read appears repeated_aug times in its batch, differently augmented; an epoch keeps its steps
    and reads 1 / repeated_aug of the samples, none twice."""
    urls = default_data["train"].replace("{000000..000009}", "{000000..000001}")

    def make(k, batch=12):
        return build_loader(urls, fields=("key", "image"), batch_size=batch, num_workers=0, seed=1,
                            transform=build_transform(True, 32, scale=(0.2, 1.0)), num_samples=240,
                            shuffle_buffer=20, repeated_aug=k)

    info = make(3)
    info.set_epoch(0)
    batches = list(info.loader)
    assert len(batches) == info.steps_per_epoch == make(1).steps_per_epoch == 20
    epoch_keys = []
    for batch in batches:
        keys = batch["key"]
        assert keys[:4] == keys[4:8] == keys[8:] and len(set(keys)) == 4  # copy-major: 4 images x 3 copies
        for i in range(4):
            assert not torch.equal(batch["image"][i], batch["image"][i + 4])
        epoch_keys += keys[:4]
    assert len(epoch_keys) == len(set(epoch_keys)) == 80
    assert info.state_dict()["repeated_aug"] == 3
    info = make(3, batch=10)  # 4 images, the last two with 2 copies
    info.set_epoch(0)
    keys = next(iter(info.loader))["key"]
    assert keys[:4] == keys[4:8] and keys[8:] == keys[:2] and len(set(keys)) == 4
    with pytest.raises(ValueError, match="repeated_aug=13 must be between 1 and batch_size=12"):
        make(13)


@pytest.mark.parametrize("num_workers", [0, 3])
def test_stream_runs_on_across_epochs(default_data, num_workers, monkeypatch):
    """One worker stream serves consecutive epochs (prefetch across the boundary, no restart), with the same
    batches as a fresh loader per epoch; 11 steps an epoch, so 3 workers swap logical roles at each boundary."""
    urls = default_data["train"].replace("{000000..000009}", "{000000..000001}")

    def make():
        return build_loader(urls, fields=("key", "image"), batch_size=16, num_workers=num_workers, seed=5,
                            transform=build_transform(True, 32, scale=(0.2, 1.0)), num_samples=176, shuffle_buffer=50)

    want = []
    for epoch in range(3):
        fresh = make()
        fresh.set_epoch(epoch)
        want += list(fresh.loader)
    starts = []
    if num_workers == 0:  # the stream runs in this process: count its starts
        from data.stream import ShardStream
        original = ShardStream.__iter__
        monkeypatch.setattr(ShardStream, "__iter__", lambda self: starts.append(1) or original(self))
    info, got = make(), []
    for epoch in range(3):
        info.set_epoch(epoch)
        got += list(info.loader)
    assert info.steps_per_epoch == 11 and len(got) == len(want) == 33
    for a, b in zip(want, got):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    if num_workers == 0:
        assert len(starts) == 1
        info.set_epoch(1)  # not the next position: the stream restarts there
        assert [b["key"] for b in info.loader] == [b["key"] for b in want[11:22]] and len(starts) == 2


@pytest.mark.skipif(not (SHARED / "cifar10" / "classes.json").exists(), reason="shared CIFAR-10 shards absent")
def test_cifar10_shards():
    root = SHARED / "cifar10"
    classes = json.loads((root / "classes.json").read_text())
    train = str(root / "cifar10-train-{000000..000009}.tar.gz")
    val = str(root / "cifar10-val-000000.tar.gz")
    assert read_info(train)["classes"] == classes and read_info(train)["num_samples"] is None
    assert sum(count_samples(u) for u in expand_urls(train)) == 50000 and count_samples(val) == 5000

    info = build_loader(val, fields=("label", "text"), batch_size=1000, num_workers=0, is_training=False,
                        num_samples=5000)
    labels, texts = [], []
    for batch in info.loader:
        labels += batch["label"].tolist()
        texts += batch["text"]
    assert len(labels) == 5000 and info.skipped() == 0
    assert all(t == f"a photo of a {classes[label]}." for label, t in zip(labels, texts))

    info = build_loader(train, fields=("image", "label"), batch_size=250, num_workers=0, num_samples=50000,
                        world_size=2, rank=1, transform=build_transform(True, 32))
    assert info.num_samples == 50000 and info.steps_per_epoch == 100 and info.classes == classes
    batch = next(iter(info.loader))
    assert batch["image"].shape == (250, 3, 32, 32) and int(batch["label"].max()) < 10


def test_randaugment_posterize_at_full_magnitude():
    # magnitude 10 makes timm's PosterizeIncreasing ask for 0 bits, which Pillow >= 13 rejects
    transform = build_transform(True, 16, auto_augment="rand-m10-n3-inc1")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(200):
        assert transform(image).shape == (3, 16, 16)


def test_epoch_coverage_tool_counts_each_sample_once_over_ranks(default_data_cache):
    from helpers import run_ranks
    outputs = run_ranks(["bench/check_epoch_coverage.py", f"data.cache_dir={default_data_cache}", "data.batch_size=50",
                         "data.num_workers=2", "--epochs", "2"], world_size=3)
    lines = [line for line in outputs[0].splitlines() if line.startswith("epoch")]
    assert len(lines) == 2
    for line in lines:
        # 5,000 samples, global batch 150: 33 steps read 4,950, each once; 50 are left for a later epoch
        assert "planned 4950, read 4950, distinct 4950, read twice or more 0" in line, line


def test_epoch_coverage_tool_with_repeated_augmentation(default_data_cache):
    from helpers import run_ranks
    outputs = run_ranks(["bench/check_epoch_coverage.py", f"data.cache_dir={default_data_cache}", "data.batch_size=50",
                         "data.num_workers=1", "data.repeated_aug=3"], world_size=2)
    line = next(line for line in outputs[0].splitlines() if line.startswith("epoch"))
    # 50 steps of 2 x 50 samples, each batch 17 images x 3 copies (the last copy dropped): 1,700 images, each once
    assert "planned 1700, read 1700, distinct 1700, read twice or more 0" in line, line
