"""Write WebDataset shards from an ImageFolder tree or a caption list: `python -m data.make_shards`.

    python -m data.make_shards --imagefolder /data/imagenet/train --out /shards/in1k-train --prefix train
    python -m data.make_shards --captions pairs.jsonl --out /shards/pairs --workers 8

Output: OUTDIR/PREFIX-%06d.tar (samples: image bytes as stored (jpg/png/webp) or re-encoded as jpg, cls,
txt, json {"class", "path"}), OUTDIR/info.json {"num_samples", "shards": {name: count}, "classes",
"skipped"} and OUTDIR/classes.json. Keys are the item's index in the plan (no '.').

The item -> shard plan is fixed before any work starts, so each worker process writes whole shards and
reruns are deterministic. Each shard is written under a temporary name and renamed when complete; a
marker in OUTDIR/.done records it, so a rerun keeps finished shards and redoes the rest. An image PIL cannot
open and load is never written: it is reported and counted in info.json ("skipped").
"""
import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from tqdm import tqdm

from .writer import atomic_json, write_info, write_shard

__all__ = ["Item", "imagefolder_items", "caption_items", "plan_shards", "convert", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_STORED_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> shard extension
_MEMBER_OVERHEAD = 4 * 1024  # tar headers and padding of one sample, for the shard size estimate


@dataclasses.dataclass(frozen=True)
class Item:
    """One source image and what is written with it."""
    path: str                         # file to read
    rel: str                          # path recorded in the sample's json
    label: Optional[int] = None
    class_name: Optional[str] = None
    caption: Optional[str] = None


def imagefolder_items(root: str) -> Tuple[List[Item], List[str]]:
    """Items of an ImageFolder tree; class index = position of the folder name in sorted order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root}")
    items = []
    for label, name in enumerate(classes):
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs.sort()  # in place: os.walk then descends in sorted order
            for file in sorted(files):
                if file.lower().endswith(IMAGE_SUFFIXES):
                    path = os.path.join(folder, file)
                    items.append(Item(path, os.path.relpath(path, root), label, name))
    return items, classes


def caption_items(jsonl: str) -> Tuple[List[Item], Optional[List[str]]]:
    """Items of a caption list: lines {"image": path, "caption": text, optional "label": int or name}.

    Relative image paths are taken from the jsonl's folder. String labels become classes (sorted names).
    """
    base = os.path.dirname(os.path.abspath(jsonl))
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    names = sorted({r["label"] for r in rows if isinstance(r.get("label"), str)})
    index = {name: i for i, name in enumerate(names)}
    items = []
    for r in rows:
        label = r.get("label")
        path = r["image"] if os.path.isabs(r["image"]) else os.path.join(base, r["image"])
        items.append(Item(path, r["image"], index.get(label, label), label if isinstance(label, str) else None,
                          str(r["caption"])))
    return items, names or None


def plan_shards(items: Sequence[Item], samples_per_shard: int, max_shard_bytes: int) -> List[List[int]]:
    """Group item indices into shards of at most samples_per_shard items and about max_shard_bytes."""
    shards, current, size = [], [], 0
    for i, item in enumerate(items):
        try:
            estimate = os.path.getsize(item.path) + _MEMBER_OVERHEAD
        except OSError:
            estimate = _MEMBER_OVERHEAD  # missing file: it will be reported and skipped when written
        if current and (len(current) >= samples_per_shard or size + estimate > max_shard_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += estimate
    if current:
        shards.append(current)
    return shards


def _image_member(path: str, resize_short: int) -> Tuple[str, bytes]:
    """(extension, bytes) of one verified image; raises if PIL cannot open and fully decode it."""
    with open(path, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    img.load()  # open() only reads the header; load() decodes everything, so truncated files fail here
    ext = _STORED_AS_IS.get(img.format)
    if ext and (not resize_short or min(img.size) <= resize_short):
        return ext, data
    if resize_short and min(img.size) > resize_short:
        w, h = img.size
        scale = resize_short / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=95)
    return "jpg", out.getvalue()


def _sample(item: Item, key: str, resize_short: int) -> Tuple[str, Dict[str, bytes]]:
    ext, data = _image_member(item.path, resize_short)
    members = {ext: data}
    if item.label is not None:
        members["cls"] = str(item.label).encode()
    if item.caption is not None:
        members["txt"] = item.caption.encode("utf-8")
    meta = {"path": item.rel} if item.class_name is None else {"class": item.class_name, "path": item.rel}
    members["json"] = json.dumps(meta).encode("utf-8")
    return key, members


def _write_task(task) -> Tuple[str, int, List[str]]:
    """Worker: write one planned shard; returns (shard name, samples written, unreadable paths)."""
    path, keyed_items, resize_short = task
    skipped = []

    def samples():
        for key, item in keyed_items:
            try:
                yield _sample(item, key, resize_short)
            except Exception as exc:  # unreadable image: report, never write
                skipped.append(item.path)
                print(f"warning: skipping unreadable image {item.path}: {exc!r}", file=sys.stderr)

    count = write_shard(path, samples())
    return os.path.basename(path), count, skipped


def _digest(keyed_items, resize_short: int) -> str:
    h = hashlib.sha1(f"resize={resize_short}".encode())
    for key, item in keyed_items:
        h.update(f"\n{key}\t{item}".encode())
    return h.hexdigest()


def convert(items: Sequence[Item], classes: Optional[List[str]], out: str, *, prefix: str = "shard",
            samples_per_shard: int = 1000, max_shard_bytes: int = 1 << 30, resize_short: int = 0,
            workers: int = 1, progress: bool = True) -> dict:
    """Write `items` as shards OUTDIR/PREFIX-%06d.tar plus info.json; finished shards of a rerun are kept."""
    os.makedirs(os.path.join(out, ".done"), exist_ok=True)
    tasks, shards, skipped = [], {}, 0
    for n, indices in enumerate(plan_shards(items, samples_per_shard, max_shard_bytes)):
        name = f"{prefix}-{n:06d}.tar"
        keyed = [(f"{i:08d}", items[i]) for i in indices]
        marker = os.path.join(out, ".done", name + ".json")
        done = _load_marker(marker)
        if done and done["digest"] == _digest(keyed, resize_short) and os.path.exists(os.path.join(out, name)):
            shards[name], skipped = done["count"], skipped + len(done["skipped"])
        else:
            tasks.append((os.path.join(out, name), keyed, resize_short))
    bar = tqdm(total=sum(len(t[1]) for t in tasks), unit="img", disable=not progress, desc=f"writing {out}")
    with multiprocessing.Pool(workers) if workers > 1 else _InProcess() as pool:
        for task, (name, count, bad) in zip(tasks, pool.imap(_write_task, tasks)):
            atomic_json(os.path.join(out, ".done", name + ".json"),
                        {"count": count, "skipped": bad, "digest": _digest(task[1], task[2])})
            shards[name], skipped = count, skipped + len(bad)
            bar.update(len(task[1]))
    bar.close()
    return write_info(out, shards, classes, skipped)


def _load_marker(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _InProcess:
    """Pool stand-in for workers=1: no processes to fork."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, tasks):
        return map(fn, tasks)


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--imagefolder", help="ImageFolder root (one folder per class)")
    src.add_argument("--captions", help='jsonl of {"image": path, "caption": text, optional "label"}')
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="approximate upper bound per shard")
    p.add_argument("--resize-short", type=int, default=0, help="shrink images whose short side is larger")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    items, classes = imagefolder_items(args.imagefolder) if args.imagefolder else caption_items(args.captions)
    info = convert(items, classes, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                   max_shard_bytes=args.max_shard_bytes, resize_short=args.resize_short, workers=args.workers)
    print(f"{info['num_samples']} samples in {len(info['shards'])} shards, {info['skipped']} skipped -> {args.out}")
    return info


if __name__ == "__main__":
    main()
