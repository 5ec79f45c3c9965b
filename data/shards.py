"""Shard I/O: expand shard URLs, read raw samples out of tar shards, count samples.

A shard is a tar (optionally gzip-compressed) whose members are named `<key>.<ext>`; consecutive members
with the same key form one sample (the WebDataset convention). Shards are untrusted input: only the
members named in `KEEP_EXTS` are read into memory (as bytes, never unpickled); the rest are skipped, and
nothing is ever extracted to disk.

Local paths are opened in random-access mode, so skipping samples (`start=`) seeks over their data
instead of reading it; `pipe:` and `http(s)` URLs are streamed through webdataset's `gopen`.
"""
import contextlib
import functools
import os
import posixpath
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import braceexpand
import webdataset as wds

__all__ = ["IMAGE_EXTS", "KEEP_EXTS", "RawSample", "expand_urls", "is_local", "local_path", "iter_samples",
           "count_samples"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEEP_EXTS = frozenset(IMAGE_EXTS + ("txt", "cls", "json"))

RawSample = Tuple[str, Dict[str, bytes]]  # (key, {ext: bytes}) with ext in KEEP_EXTS


def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """Brace-expand a pattern, a list of patterns, or sources joined with "::" into a flat list of URLs."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = []
    for pattern in patterns:
        for source in pattern.split("::"):
            source = source.strip()
            if source:
                out.extend(braceexpand.braceexpand(source))
    return out


def is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _split_name(name: str) -> Optional[Tuple[str, str]]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'); None for names that are not sample members."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return posixpath.join(dirname, stem), ext.lower()


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    if is_local(url):
        with tarfile.open(local_path(url), "r:*") as tar:  # random access: skipped members are seeked over
            yield tar
        return
    with contextlib.closing(wds.gopen(url, "rb")) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        yield tar


def iter_samples(
        url: str,
        start: int = 0,
        stop: Optional[int] = None,
        on_error: Optional[Callable[[str, Exception], None]] = None,
) -> Iterator[RawSample]:
    """Yield samples `start <= index < stop` of one shard as (key, {ext: bytes}).

    Only members in KEEP_EXTS are read. A truncated or unreadable shard ends early: `on_error(url, exc)`
    is called once and the sample being assembled is dropped (it may be incomplete).
    """
    index, key, members = -1, None, {}
    try:
        with _open_tar(url) as tar:
            for member in tar:
                split = _split_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None and index >= start:
                        yield key, members
                    index, key, members = index + 1, split[0], {}
                    if stop is not None and index >= stop:
                        return
                if index >= start and split[1] in KEEP_EXTS:
                    members[split[1]] = tar.extractfile(member).read()
        if key is not None and index >= start:
            yield key, members
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:  # zlib/gzip errors are OSError/EOFError
        if on_error is None:
            raise
        on_error(url, exc)


def count_samples(url: str) -> int:
    """Number of samples in one shard, by scanning its member names (data is seeked over where possible)."""
    stamp = None
    if is_local(url):
        st = os.stat(local_path(url))
        stamp = (st.st_size, st.st_mtime_ns)
    return _count_cached(url, stamp)


@functools.lru_cache(maxsize=65536)
def _count_cached(url: str, stamp) -> int:
    # stamp (size, mtime) keys the cache so a rewritten local shard is counted again
    keys, last = 0, None
    with _open_tar(url) as tar:
        for member in tar:
            split = _split_name(member.name) if member.isfile() else None
            if split is not None and split[0] != last:
                keys, last = keys + 1, split[0]
    return keys
