"""Decode the members of one raw sample into the fields a batch carries.

Only images (PIL, restricted to JPEG/PNG/WEBP parsers), text (utf-8), cls (int) and json (json.loads) are
decoded; anything else in a shard is never looked at. Any failure raises, and the caller counts the sample
as skipped.
"""
import io
import json
from typing import Dict, Sequence

from PIL import Image

from .shards import IMAGE_EXTS

__all__ = ["FIELDS", "decode_sample"]

FIELDS = frozenset({"image", "label", "text", "key"})
_PIL_FORMATS = ("JPEG", "PNG", "WEBP")


def _image(members: Dict[str, bytes]) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in members:
            img = Image.open(io.BytesIO(members[ext]), formats=_PIL_FORMATS)
            img.load()  # PIL decodes lazily: force it here so truncated data fails now, not in the transform
            return img.convert("RGB")
    raise ValueError("no image member (jpg/jpeg/png/webp)")


def _label(members: Dict[str, bytes]) -> int:
    if "cls" in members:
        return int(members["cls"].decode("utf-8").strip())
    if "json" in members:
        label = json.loads(members["json"]).get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            return label
    raise ValueError("no integer label (cls, or json 'label')")


def _text(members: Dict[str, bytes]) -> str:
    if "txt" not in members:
        raise ValueError("no txt member")
    return members["txt"].decode("utf-8")


def decode_sample(key: str, members: Dict[str, bytes], fields: Sequence[str]) -> dict:
    """{field: value} for the requested fields: image -> RGB PIL image, label -> int, text -> str, key -> str."""
    out = {}
    for field in fields:
        if field == "image":
            out["image"] = _image(members)
        elif field == "label":
            out["label"] = _label(members)
        elif field == "text":
            out["text"] = _text(members)
        elif field == "key":
            out["key"] = key
    return out
