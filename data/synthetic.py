"""The embedded default data set: procedural shapes with captions, generated once, no download.

Each 64x64 image shows one shape (the class: circle, square, triangle, ...) in one of 8 colours, 3 sizes and
9 positions, rotated at random, on a dark plain / striped / checkered / noisy background. Its caption says
all of it: "a small red triangle at the top left on a striped background". Colour, size, position and
background vary independently of the shape, so a classifier must learn shape to beat chance (1/8).

Written as shards with the writer of data.make_shards (data/writer.py) into CACHE/default-v1/{train,eval}/, CACHE being
`cache_dir`, else $VIM_DATA_CACHE, else ~/.cache/vim_pretrain. Generation is deterministic in `seed` and
takes a few seconds; concurrent processes (several ranks) wait on a file lock, and the folder only appears
complete, through an atomic rename.
"""
import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .writer import write_info, write_shard

__all__ = ["SHAPES", "COLOURS", "render", "generate", "default_dataset"]

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "ring")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (60, 90, 235), "yellow": (235, 215, 40),
           "orange": (245, 140, 30), "purple": (160, 70, 210), "white": (240, 240, 240), "cyan": (40, 205, 215)}
SIZES = {"small": 0.15, "medium": 0.23, "large": 0.32}  # circumradius / image size
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
TEXTURES = ("plain", "striped", "checkered", "noisy")
VERSION = "default-v1"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float):
    """Vertices of a polygonal shape with circumradius r, rotated by angle (radians)."""
    if shape == "star":
        radii, n = [r if i % 2 == 0 else 0.45 * r for i in range(10)], 10
    elif shape == "cross":  # a plus sign: the 3 corners of one arm, turned 4 times by 90 degrees
        w = 0.35 * r
        arm = [(w, r), (w, w), (r, w)]
        pts = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, -1), (-1, 0), (0, 1)) for x, y in arm]
        return [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                for x, y in pts]
    else:
        n = {"square": 4, "triangle": 3, "hexagon": 6, "diamond": 4}[shape]
        radii = [r, 0.55 * r] * 2 if shape == "diamond" else [r] * n  # diamond: a rhombus, not a square
    return [(cx + rad * math.cos(angle + 2 * math.pi * i / n), cy + rad * math.sin(angle + 2 * math.pi * i / n))
            for i, rad in enumerate(radii)]


def _background(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """(size, size, 3) uint8 dark background, so every colour keeps its contrast."""
    base = rng.integers(10, 80, size=3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    yy, xx = np.mgrid[:size, :size]
    if texture == "striped":
        period, theta = rng.integers(4, 12), rng.uniform(0, math.pi)
        img += 35 * ((xx * math.cos(theta) + yy * math.sin(theta)) // period % 2)[..., None]
    elif texture == "checkered":
        cell = rng.integers(4, 12)
        img += 35 * ((xx // cell + yy // cell) % 2)[..., None]
    elif texture == "noisy":
        img += rng.normal(0, 18, size=(size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _position(row: int, col: int) -> str:
    if row == 1:
        return COLS[col]  # left / center / right
    return ROWS[row] if col == 1 else f"{ROWS[row]} {COLS[col]}"


def render(seed: int, index: int, size: int = 64) -> Tuple[Image.Image, int, str, Dict[str, str]]:
    """Sample `index` of the data set with `seed`: (RGB image, class index, caption, attributes)."""
    rng = np.random.default_rng([seed, index])
    label = index % len(SHAPES)  # balanced classes
    attrs = {"shape": SHAPES[label], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
             "size": list(SIZES)[rng.integers(len(SIZES))], "texture": TEXTURES[rng.integers(len(TEXTURES))]}
    row, col = rng.integers(3), rng.integers(3)
    attrs["position"] = _position(row, col)
    r = SIZES[attrs["size"]] * size
    cx, cy = (r + (size - 2 * r) * (k + 0.5 + rng.uniform(-0.25, 0.25)) / 3 for k in (col, row))
    img = Image.fromarray(_background(rng, attrs["texture"], size))
    draw, fill = ImageDraw.Draw(img), COLOURS[attrs["colour"]]
    if attrs["shape"] in ("circle", "ring"):
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=fill if attrs["shape"] == "circle" else None, outline=fill,
                     width=max(2, round(0.3 * r)))
    else:
        draw.polygon(_polygon(attrs["shape"], cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    where = {"left": "on the left", "right": "on the right", "center": "in the center"}.get(
        attrs["position"], f"at the {attrs['position']}")
    caption = f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {where} on a {attrs['texture']} background"
    return img, label, caption, attrs


def _samples(seed: int, start: int, stop: int, size: int) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    for index in range(start, stop):
        img, label, caption, attrs = render(seed, index, size)
        jpg = io.BytesIO()
        img.save(jpg, format="JPEG", quality=95)
        yield f"{index:08d}", {"jpg": jpg.getvalue(), "cls": str(label).encode(), "txt": caption.encode(),
                               "json": json.dumps({"class": attrs["shape"], **attrs}).encode()}


def generate(root: str, *, seed: int = 0, train_samples: int = 5000, eval_samples: int = 1000,
             samples_per_shard: int = 500, size: int = 64) -> None:
    """Write root/train/train-%06d.tar and root/eval/eval-%06d.tar (+ info.json each)."""
    # eval images continue the index range after train, so the two splits never share an image
    for split, start, n in (("train", 0, train_samples), ("eval", train_samples, eval_samples)):
        out = os.path.join(root, split)
        os.makedirs(out, exist_ok=True)
        shards = {}
        for s, lo in enumerate(range(0, n, samples_per_shard)):
            name = f"{split}-{s:06d}.tar"
            hi = min(lo + samples_per_shard, n)
            shards[name] = write_shard(os.path.join(out, name), _samples(seed, start + lo, start + hi, size))
        write_info(out, shards, list(SHAPES))


def _pattern(root: str, split: str) -> str:
    names = sorted(f for f in os.listdir(os.path.join(root, split)) if f.endswith(".tar"))
    return os.path.join(root, split, f"{split}-{{000000..{len(names) - 1:06d}}}.tar")


def default_dataset(cache_dir: Optional[str] = None) -> dict:
    """Generate the default data set on first use (cached) and describe it.

    Returns {"train": pattern, "eval": pattern, "num_classes": 8, "classes": [...], "train_samples": 5000,
    "eval_samples": 1000}.
    """
    parent = cache_dir or os.environ.get("VIM_DATA_CACHE") or os.path.expanduser("~/.cache/vim_pretrain")
    root = os.path.join(parent, VERSION)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, VERSION + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second rank waits here, then finds the finished folder
        if not os.path.isdir(root):
            tmp = tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=parent)
            try:
                generate(tmp)
                os.rename(tmp, root)  # atomic: readers see all of it or nothing, even without the lock
            except OSError:
                if not os.path.isdir(root):  # lost a race where flock does not work (some network file systems)
                    raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)
    counts = {s: _num_samples(os.path.join(root, s, "info.json")) for s in ("train", "eval")}
    return {"train": _pattern(root, "train"), "eval": _pattern(root, "eval"), "num_classes": len(SHAPES),
            "classes": list(SHAPES), "train_samples": counts["train"], "eval_samples": counts["eval"]}


def _num_samples(info_path: str) -> int:
    with open(info_path) as f:
        return json.load(f)["num_samples"]
