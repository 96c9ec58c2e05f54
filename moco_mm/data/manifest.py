"""`moco-mm make-manifest`: the manifest.json our loader reads, for shards written by others.

    make_manifest(["laion/00000.tar", ...] or ["laion/"], "laion/manifest.json", mode="auto")

Two ways to learn each shard's sample count (`shard_samples`, what training plans with):
  * stats (img2dataset output): `NNNNN_stats.json` beside `NNNNN.tar`, whose `successes` is
    the number of samples img2dataset wrote into that tar (it writes the stats file when the
    shard is complete, so a tar without one is an unfinished shard: an error). No tar is read.
  * count: every shard is read (local paths by their headers and KEY.json members, `pipe:` /
    http URLs streamed, with retries), `--workers` at a time.

Sample ids (KEY.json "sample_id", else the integer key: the loader's rule) must be unique
across the manifest. Counting checks this exactly and cheaply: each shard's ids are checked
within the shard, and only shards whose [min, max] id ranges overlap are compared (read a
second time); make_shards and img2dataset shards never overlap unless outputs were merged.
Stats mode checks img2dataset's key scheme instead (key = shard number followed by the
sample's index): two shards with the same shard number (from two output folders) hold the
same ids; `check_ids=True` reads the shards too, as counting does, and compares the counts
with the stats.

The manifest written: {"format": MANIFEST_FORMAT, "input": [...], "shards": [names or URLs],
"shard_samples": [...], "samples": total, "counted_by": "img2dataset-stats" | "reading"}.
Shards inside the manifest's folder are stored relative to it (as make_shards does).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moco_mm.data.make_shards import MANIFEST_FORMAT
from moco_mm.data.samples import iter_raw_samples
from moco_mm.data.shard_io import expand_urls, is_meta, is_remote, local_path
from moco_mm.data.sources import DataError, _group

__all__ = ["make_manifest", "ShardScan", "scan_shard", "read_img2dataset_stats"]

_STATS_RE = re.compile(r"^(\d+)_stats\.json$")


@dataclass
class ShardScan:
    """One shard read through: its sample count and sample ids (sorted; samples without a
    usable id are counted but not listed: the loader skips them as corrupt)."""

    url: str
    count: int
    ids: np.ndarray

    @property
    def id_range(self) -> tuple[int, int] | None:
        return (int(self.ids[0]), int(self.ids[-1])) if len(self.ids) else None


def _sample_id(key: str, meta: bytes | None) -> int | None:
    """The loader's rule (samples._decode_meta): KEY.json "sample_id", else the integer key."""
    if meta is not None:
        try:
            sid = json.loads(meta.decode("utf-8")).get("sample_id")
        except (UnicodeDecodeError, ValueError, AttributeError):
            sid = None
        if isinstance(sid, int) and not isinstance(sid, bool):
            return sid
    tail = key.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def scan_shard(url: str, *, retries: int = 3, backoff_s: float = 1.0) -> ShardScan:
    """Count one shard's samples and collect their ids. Local tars: headers, plus the small
    KEY.json members (seeking past images); remote ones are streamed (with retries).
    Raises DataError naming the shard (unreadable, or an id twice within it)."""
    ids: list[int] = []
    count = 0
    if not is_remote(url):
        path = local_path(url)
        try:
            with tarfile.open(path, "r:*") as tar:
                infos = [m for m in tar if m.isreg() and not is_meta(m.name)]
                for key, items in _group((m.name, m) for m in infos):
                    count += 1
                    meta = next((tar.extractfile(m).read() for _, ext, m in items if ext == "json"), None)
                    sid = _sample_id(key, meta)
                    if sid is not None:
                        ids.append(sid)
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"{url}: cannot read the tar to count its samples: {e}") from None
    else:
        for raw in iter_raw_samples(url, expected=None, retries=retries, backoff_s=backoff_s):
            count += 1
            sid = _sample_id(raw.key, raw.members.get("json"))
            if sid is not None:
                ids.append(sid)
    arr = np.sort(np.asarray(ids, dtype=np.int64))
    dup = np.flatnonzero(arr[1:] == arr[:-1])
    if len(dup):
        raise DataError(f"{url}: sample id {int(arr[dup[0]])} occurs twice in this shard")
    return ShardScan(url, count, arr)


def read_img2dataset_stats(path: Path) -> int:
    """`successes` of an img2dataset NNNNN_stats.json: the samples written into NNNNN.tar."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable img2dataset stats file: {e}") from None
    n = stats.get("successes") if isinstance(stats, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DataError(f"{path}: 'successes' must be a non-negative integer (the samples img2dataset wrote "
                        f"into the tar), got {n!r}")
    return n


def _stats_shards(folder: Path) -> list[tuple[str, int, int]]:
    """(tar path, shard number, successes) of an img2dataset output folder, in shard order."""
    stats = {int(m.group(1)): p for p in folder.iterdir() if (m := _STATS_RE.match(p.name))}
    tars = {int(p.stem): p for p in folder.glob("*.tar") if p.stem.isdigit()}
    lone = sorted(set(tars) - set(stats))
    if lone:
        raise DataError(f"{tars[lone[0]]}: no {tars[lone[0]].stem}_stats.json beside it (and {len(lone) - 1} more): "
                        f"img2dataset writes it when a shard is complete, so this shard is unfinished; rerun "
                        f"img2dataset, delete the tar, or count with --count")
    missing = sorted(set(stats) - set(tars))
    if missing:
        raise DataError(f"{stats[missing[0]]}: its tar {stats[missing[0]].name.replace('_stats.json', '.tar')} "
                        f"is missing (and {len(missing) - 1} more)")
    return [(str(tars[k]), k, read_img2dataset_stats(stats[k])) for k in sorted(tars)]


def _progress(total: int, enabled: bool, what: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="shard", desc=what, dynamic_ncols=True, file=sys.stderr)


def _scan_all(urls: Sequence[str], workers: int, progress: bool, retries: int, backoff_s: float,
              what: str = "counting") -> list[ShardScan]:
    def one(u: str) -> ShardScan:
        return scan_shard(u, retries=retries, backoff_s=backoff_s)

    bar = _progress(len(urls), progress, what)
    try:
        if workers <= 1:
            out = []
            for u in urls:
                out.append(one(u))
                bar.update(1)
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, u) for u in urls]
            out = []
            for f in futures:
                out.append(f.result())
                bar.update(1)
            return out
    finally:
        bar.close()


def check_unique_ids(scans: Sequence[ShardScan], rescan: Callable[[list[str]], list[ShardScan]] | None = None) -> None:
    """Raise DataError naming both shards and the id when two shards share a sample id.
    Only shards whose id ranges overlap are compared (`rescan` re-reads them when their ids
    were dropped to save memory; by default the scans' own ids are used)."""
    spans = sorted((r[0], r[1], i) for i, s in enumerate(scans) if (r := s.id_range) is not None)
    clusters: list[list[int]] = []
    hi = None
    for lo, top, i in spans:
        if hi is not None and lo <= hi:
            clusters[-1].append(i)
            hi = max(hi, top)
        else:
            clusters.append([i])
            hi = top
    for cluster in clusters:
        if len(cluster) < 2:
            continue
        members = [scans[i] for i in cluster]
        if rescan is not None:
            members = rescan([m.url for m in members])
        ids = np.concatenate([m.ids for m in members])
        owner = np.concatenate([np.full(len(m.ids), k, dtype=np.int64) for k, m in enumerate(members)])
        order = np.argsort(ids, kind="stable")
        ids, owner = ids[order], owner[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if len(dup):
            j = dup[0]
            a, b = members[int(owner[j])].url, members[int(owner[j + 1])].url
            raise DataError(f"sample id {int(ids[j])} is in two shards: {a} and {b} ({len(dup)} duplicate(s) "
                            f"among shards with overlapping id ranges; merged outputs of two runs? give "
                            f"one of them other ids, e.g. make_shards --id-offset)")


def _inputs(specs: Sequence[str]) -> list[str]:
    """Directories -> their *.tar (sorted); patterns and pipe: URLs -> expanded."""
    out: list[str] = []
    for spec in specs:
        if not is_remote(spec) and Path(local_path(spec)).is_dir():
            tars = sorted(str(p) for p in Path(local_path(spec)).glob("*.tar"))
            if not tars:
                raise DataError(f"{spec}: directory holds no *.tar shards")
            out.extend(tars)
        else:
            urls = expand_urls(spec)
            missing = [u for u in urls if not is_remote(u) and not Path(local_path(u)).is_file()]
            if missing:
                raise DataError(f"{missing[0]}: no such shard file ({len(missing)} missing in {spec!r})")
            out.extend(urls)
    if not out:
        raise DataError("make-manifest: no shards given")
    return out


def make_manifest(inputs: Sequence[str], out: str | Path, *, mode: str = "auto", workers: int = 8,
                  progress: bool = False, url_template: str | None = None, check_ids: bool = False,
                  retries: int = 3, backoff_s: float = 1.0, overwrite: bool = False) -> dict:
    """Write the manifest `out` (a .json path, or a folder: FOLDER/manifest.json) and return it.

    mode: "stats" (img2dataset folders: `successes` of NNNNN_stats.json), "count" (read every
    shard), "auto" (stats for folders holding *_stats.json, else count; one mode for all).
    url_template: store each shard as this URL instead of its local path, `{name}` being its
    file name, e.g. "pipe:aws s3 cp s3://bucket/laion/{name} -" (count locally, train remotely).
    """
    out = Path(out)
    if out.suffix != ".json":
        out = out / "manifest.json"
    if out.exists() and not overwrite:
        raise DataError(f"{out}: exists; pass --overwrite to replace it")
    if mode not in ("auto", "stats", "count"):
        raise ValueError(f"mode: auto, stats or count, got {mode!r}")
    folders = [Path(local_path(s)) for s in inputs if not is_remote(s) and Path(local_path(s)).is_dir()]
    if mode == "auto":
        has_stats = [any(_STATS_RE.match(p.name) for p in f.iterdir()) for f in folders]
        mode = "stats" if folders and len(folders) == len(inputs) and all(has_stats) else "count"
    if mode == "stats":
        if len(folders) != len(inputs):
            raise DataError("make-manifest --stats: give img2dataset output folders (NNNNN.tar + NNNNN_stats.json)")
        shards: list[tuple[str, int, int]] = []
        owner: dict[int, str] = {}
        for folder in folders:
            for tar, number, n in _stats_shards(folder):
                if number in owner:
                    raise DataError(f"{owner[number]} and {tar} have the same img2dataset shard number {number}, so "
                                    f"the same sample ids (key = shard number followed by the sample's index, e.g. "
                                    f"id {number}0000 in both): outputs of two runs merged; rerun one with other "
                                    f"shard numbers or re-key it")
                owner[number] = tar
                shards.append((tar, number, n))
        urls = [t for t, _, _ in shards]
        counts = [n for _, _, n in shards]
        if check_ids:
            scans = _scan_all(urls, workers, progress, retries, backoff_s, "checking")
            for s, n in zip(scans, counts):
                if s.count != n:
                    raise DataError(f"{s.url}: holds {s.count} samples but its stats file says {n} (successes)")
            check_unique_ids(scans)
        counted_by = "img2dataset-stats"
    else:
        urls = _inputs(inputs)
        scans = _scan_all(urls, workers, progress, retries, backoff_s)
        counts = [s.count for s in scans]
        check_unique_ids(scans)
        counted_by = "reading"
    names = [_stored(u, out.parent, url_template) for u in urls]
    manifest = {"format": MANIFEST_FORMAT, "input": [str(i) for i in inputs], "shards": names,
                "shard_samples": counts, "samples": sum(counts), "counted_by": counted_by,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return manifest


def _stored(url: str, base: Path, template: str | None) -> str:
    if template is not None:
        return template.replace("{name}", Path(local_path(url)).name if not is_remote(url) else url)
    if is_remote(url):
        return url
    p = Path(local_path(url)).resolve()
    try:
        return str(p.relative_to(base.resolve()))
    except ValueError:
        return str(p)
