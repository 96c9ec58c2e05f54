"""Shard lists: a spec (manifest, directory, brace pattern, pipe: URLs) -> URLs and counts.

    ShardSource.from_spec("data/train/manifest.json")   # or a dir, a pattern, pipe: URLs, '::'-joined
        .urls     ("data/train/shard-000000.tar", ...)
        .counts   (samples per shard, or None for remote shards without a manifest)
    count_samples(path)   samples in a local tar, from its headers only
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from moco_mm.data.make_shards import MANIFEST
from moco_mm.data.shard_io import expand_urls, is_meta, split_name
from moco_mm.data.shard_io import is_remote as _is_remote
from moco_mm.data.shard_io import local_path as _local_path

__all__ = ["DataError", "ShardSource", "count_samples"]


class DataError(RuntimeError):
    """The data cannot produce the requested stream; the message names the shard or setting."""


@dataclass(frozen=True)
class ShardSource:
    """An ordered shard list and, when known, the raw samples in each shard.

    `urls` are local paths or anything `shard_io.open_url` opens (`pipe:cmd`, `file:`, http).
    `counts[i]` is the number of samples (member groups) in `urls[i]`; None when they are
    unknown (remote shards without a manifest): training then refuses to plan, eval works.
    """

    urls: tuple[str, ...]
    counts: tuple[int, ...] | None = None

    @classmethod
    def from_spec(cls, spec: str | Path | Sequence[str | Path]) -> "ShardSource":
        """Resolve a spec. Accepted (several may be joined with '::' or given as a list):
        a `manifest.json` (or any .json manifest), a directory (its manifest.json, else its
        `*.tar` files, counted by reading tar headers), local paths or brace patterns
        (`data/shard-{000000..000099}.tar`, counted by reading headers), and `pipe:` URLs
        (no counts unless listed in a manifest: a manifest's `shards` may hold pipe: URLs).
        """
        parts: list[str] = []
        if isinstance(spec, (str, Path)):
            parts = [p for p in str(spec).split("::") if p]
        else:
            parts = [str(p) for p in spec]
        if not parts:
            raise DataError("empty shard spec: give a manifest.json, a directory, a brace pattern or pipe: URLs")
        urls: list[str] = []
        counts: list[int] | None = []
        for part in parts:
            u, c = _resolve_part(part)
            urls.extend(u)
            counts = None if counts is None or c is None else counts + list(c)
        if not urls:
            raise DataError(f"shard spec {spec!r} names no shards")
        return cls(tuple(urls), tuple(counts) if counts is not None else None)

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def total_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    def require_counts(self) -> tuple[int, ...]:
        if self.counts is None:
            remote = next((u for u in self.urls if _is_remote(u)), self.urls[0])
            raise DataError(
                f"no per-shard sample counts for {remote!r} (and {len(self.urls) - 1} more): training needs "
                f"them to give every rank the same number of steps. Write a manifest.json whose 'shards' "
                f"lists these URLs and 'shard_samples' their sample counts (make_shards writes one) and "
                f"pass the manifest's path as the shard spec")
        return self.counts


def _resolve_part(part: str) -> tuple[list[str], list[int] | None]:
    if not _is_remote(part):
        p = Path(_local_path(part))
        if p.is_dir():
            if (p / MANIFEST).is_file():
                return _read_manifest(p / MANIFEST)
            tars = sorted(str(t) for t in p.glob("*.tar"))
            if not tars:
                raise DataError(f"{p}: directory holds neither {MANIFEST} nor *.tar shards")
            return tars, [count_samples(t) for t in tars]
        if p.suffix == ".json" and p.is_file():
            return _read_manifest(p)
    urls = expand_urls(part)  # braces; '::' was split above
    if all(not _is_remote(u) for u in urls):
        missing = [u for u in urls if not Path(_local_path(u)).is_file()]
        if missing:
            raise DataError(f"shard spec {part!r}: {len(missing)} file(s) missing, e.g. {missing[0]}")
        return urls, [count_samples(u) for u in urls]
    return urls, None


def _read_manifest(path: Path) -> tuple[list[str], list[int] | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
        raise DataError(f"{path}: 'shards' must be a list of shard file names or URLs")
    urls = [s if _is_remote(s) or os.path.isabs(s) else str(path.parent / s) for s in shards]
    missing = [u for u in urls if not _is_remote(u) and not Path(_local_path(u)).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed shard(s) missing, e.g. {missing[0]}")
    counts = data.get("shard_samples")
    if counts is None:
        if any(_is_remote(u) for u in urls):
            return urls, None
        return urls, [count_samples(u) for u in urls]
    if (not isinstance(counts, list) or len(counts) != len(urls)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise DataError(f"{path}: 'shard_samples' must list one non-negative int per shard "
                        f"({len(urls)} shards)")
    return urls, counts


def _group(members: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, list[tuple[str, str, Any]]]]:
    """Consecutive members sharing a key form one sample: yields (key, [(name, ext, payload)])."""
    key: str | None = None
    items: list[tuple[str, str, Any]] = []
    for name, payload in members:
        k, ext = split_name(name)
        if items and k != key:
            yield key, items  # type: ignore[misc]
            items = []
        key = k
        items.append((name, ext, payload))
    if items:
        yield key, items  # type: ignore[misc]


def count_samples(path: str) -> int:
    """Samples in a local tar by reading its headers only (same grouping as the stream)."""
    try:
        with tarfile.open(_local_path(path), "r:*") as tar:
            names = [m.name for m in tar if m.isreg() and not is_meta(m.name)]
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: cannot read tar headers to count samples: {e}") from None
    return sum(1 for _ in _group((n, None) for n in names))
