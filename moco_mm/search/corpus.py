"""Corpora to embed: shard sets, image folders, CSV/TSV/JSONL tables -> Items
(id, image, captions, source), bad inputs skipped and recorded."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from moco_mm.data import DataError, ShardSource, decode_sample, iter_raw_samples
from moco_mm.data.make_shards import MANIFEST, InputError, read_rows
from moco_mm.search.encoder import SearchError

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One corpus image: `image` is a path (loaded lazily) or an already decoded image."""

    id: int
    source: str
    captions: list[str]
    image: str | Image.Image


_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def _is_shard_spec(data: str) -> bool:
    """Shards: a manifest, a folder of tars, brace patterns, pipe: URLs. Otherwise a
    table (CSV/TSV/JSONL) or a folder of image files."""
    p = Path(data)
    if p.is_dir():
        return (p / MANIFEST).is_file() or any(p.glob("*.tar"))
    return p.suffix.lower() not in _TABLE_SUFFIXES


def corpus_size(data: str | os.PathLike) -> int | None:
    """Samples in the corpus when cheaply known (shard counts, table rows), else None."""
    data = str(data)
    try:
        if _is_shard_spec(data):
            return ShardSource.from_spec(data).total_samples
        return len(read_rows(data))
    except (DataError, InputError):
        return None  # iter_items raises the same error with its message


def iter_items(data: str | os.PathLike, skipped: list[dict] | None = None) -> Iterator[Item]:
    """The images of a corpus, in a fixed order.

    data: a shard spec (manifest.json, shard folder, brace pattern; see ShardSource), a
    folder of images (same-stem .txt captions optional; ids = sorted position), or a
    CSV/TSV/JSONL with `image` and `caption` columns (ids = row position). Samples that
    cannot be read are appended to `skipped` ({"source", "reason"}) instead of raising.
    """
    skipped = skipped if skipped is not None else []
    data = str(data)
    if _is_shard_spec(data):
        source = ShardSource.from_spec(data)
        counts = source.counts or (None,) * len(source.urls)
        for url, count in zip(source.urls, counts):
            for raw in iter_raw_samples(url, lambda u, e: log.warning("shard %s ended early: %s", u, e), count):
                try:
                    item = item_from_raw(raw, url)
                except Exception as e:  # data._BadSample: a corrupt sample is skipped, not fatal
                    skipped.append({"source": f"{url}:{raw.key}", "reason": str(e)})
                    continue
                yield item
        return
    try:
        rows = read_rows(data)
    except InputError as e:
        raise SearchError(str(e)) from None
    for row in rows:
        if row.error:
            skipped.append({"source": row.image, "reason": row.error})
            continue
        path = Path(row.base) / row.image
        yield Item(row.index, str(path), _row_captions(row), str(path))


def item_from_raw(raw, url: str) -> Item:
    """One raw shard sample (moco_mm.data.iter_raw_samples) -> Item with a decoded image.
    Raises on a corrupt sample (the reason is the message); iter_items skips those."""
    dec = decode_sample(raw)
    return Item(dec.sample_id, _shard_source(raw, url), dec.captions, dec.image)


def _shard_source(raw, url: str) -> str:
    """The original image path make_shards recorded, else shard:key."""
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
        if isinstance(meta.get("source"), str) and meta["source"]:
            return meta["source"]
    except (KeyError, ValueError, AttributeError):
        pass
    return f"{url}:{raw.key}"


def _row_captions(row) -> list[str]:
    """Captions are optional when indexing: a folder image without its .txt has none."""
    if row.caption_file is not None:
        try:
            text = Path(row.caption_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        return [c.strip() for c in text.splitlines() if c.strip()]
    return [c.strip() for c in (row.captions or ()) if c.strip()]
