"""Metadata beside the shards: info.json (written by data.make_shards) and classes.json.

info.json: {"num_samples": int, "shards": {file name: samples}, "classes": [names], "skipped": int}.
classes.json: a list of names, or of {"index": i, "name": ...} records (the shared ImageNet sample).
Only local shard folders are looked at.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Union

from .shards import expand_urls, is_local, local_path

__all__ = ["read_info"]


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _class_names(entries) -> Optional[List[str]]:
    if not isinstance(entries, list) or not entries:
        return None
    if all(isinstance(e, dict) for e in entries):
        entries = [e["name"] for e in sorted(entries, key=lambda e: e.get("index", 0))]
    return [str(e) for e in entries]


def read_info(urls: Union[str, Sequence[str]]) -> Optional[dict]:
    """Sizes and class names for a set of shards, from the metadata files in their folders.

    Returns None when no folder has any, else {"num_samples": int | None, "shard_counts": list[int] | None
    (one per expanded URL), "classes": list[str] | None}. Sizes are summed over the selected shards when
    info.json lists per-shard counts, so a subset of a folder's shards gets its exact size.
    """
    urls = expand_urls(urls)
    folders: Dict[str, dict] = {}
    for url in urls:
        folder = os.path.dirname(local_path(url)) if is_local(url) else None
        if folder is not None and folder not in folders:
            info = _load(os.path.join(folder, "info.json"))
            classes = _class_names(_load(os.path.join(folder, "classes.json")))
            folders[folder] = {"info": info if isinstance(info, dict) else None, "classes": classes}
    found = [f for f in folders.values() if f["info"] or f["classes"]]
    if not found:
        return None

    counts = []
    for url in urls:
        folder = folders.get(os.path.dirname(local_path(url))) if is_local(url) else None
        shards = ((folder or {}).get("info") or {}).get("shards") or {}
        counts.append(shards.get(os.path.basename(local_path(url))))
    if all(c is not None for c in counts):
        num_samples = sum(counts)
    else:
        counts = None
        # no per-shard counts: trust num_samples as written, if every shard is local and its folder has one
        totals = [(f["info"] or {}).get("num_samples") for f in folders.values()]
        known = all(is_local(u) for u in urls) and all(isinstance(t, int) for t in totals)
        num_samples = sum(totals) if known else None
    classes = next((f["info"].get("classes") for f in found if f["info"] and f["info"].get("classes")), None)
    classes = _class_names(classes) or next((f["classes"] for f in found if f["classes"]), None)
    return {"num_samples": num_samples, "shard_counts": counts, "classes": classes}
