"""The one shard writer: samples -> tar files, and the info.json / classes.json beside them.

Used by data.make_shards (ImageFolder / caption lists) and data.synthetic (the default data set).
"""
import io
import json
import os
import tarfile
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["write_shard", "write_info", "atomic_json"]


def write_shard(path: str, samples: Iterable[Tuple[str, Dict[str, bytes]]]) -> int:
    """Write samples (key, {ext: bytes}) to a tar atomically (temp name, then rename); returns the count.

    Headers carry no time or owner, so the same samples give byte-identical shards.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if "." in key:
                    raise ValueError(f"sample key {key!r} contains '.'")
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(data), 0o444
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # interrupted: leave no half-written file behind
            os.remove(tmp)
    return count


def atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_info(out: str, shards: Dict[str, int], classes: Optional[List[str]], skipped: int = 0) -> dict:
    """Write OUTDIR/info.json (and classes.json when labelled); returns the info dict."""
    info = {"num_samples": sum(shards.values()), "shards": dict(sorted(shards.items())), "skipped": skipped}
    if classes:
        info["classes"] = list(classes)
        atomic_json(os.path.join(out, "classes.json"), list(classes))
    atomic_json(os.path.join(out, "info.json"), info)
    return info
