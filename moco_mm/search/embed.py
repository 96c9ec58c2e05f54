"""Distributed, resumable corpus embedding: a shard set -> one part of vectors per shard.

    torchrun --nproc_per_node=8 -m moco_mm.embed --export E --data SHARDS --out EMB_DIR [--captions]
    python -m moco_mm.embed --export E --data SHARDS --out EMB_DIR      # one process
    moco-mm embed ...                                                   # the same program
    moco-mm search build-index --emb EMB_DIR --out INDEX_DIR --max-ram 2GB   # then (streaming.py)

Shard i of the spec's ordered list (ShardSource.urls) belongs to rank i % WORLD_SIZE, so
the assignment is fixed and ranks never talk: no process group, no barrier, a slow or dead
rank holds nobody up. Each rank embeds its shards on its device (CUDA LOCAL_RANK when
present, optional bf16 autocast) and writes one part per shard as it finishes:

    EMB_DIR/embed.json                  format, export, model_fingerprint, embed_dim, dtype,
                                        captions, thumb_side, data, shards (written first)
    EMB_DIR/parts/part-NNNNNN/          NNNNNN = the shard's position in the list
        images.npy                      [n, D] unit rows, float16 (default) or float32
        images.jsonl                    line i: {"id", "source", "captions"} of row i
        captions.npy                    [m, D] with --captions: every caption of every row,
                                        row by row, in order (images.jsonl says how many)
        thumbs.bin, thumbs.idx.npy      moco_mm.search.thumbs, one thumbnail per row
    EMB_DIR/parts/part-NNNNNN.done      JSON: shard, rank, model_fingerprint, images,
                                        captions, skipped [{source, reason}], seconds

A part is built in `part-NNNNNN.tmp-PID/`, renamed into place, and its `.done` marker is
written last (tmp file + os.replace): only a marked part counts. A restarted job skips
marked parts and redoes the rest, removing their unmarked leftovers; other stray tmp files
are ignored. embed.json fixes the model, dtype, captions and shard list: a restart that
differs in any of them is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from moco_mm.data import DataError, ShardSource, iter_raw_samples
from moco_mm.search.corpus import Item, _is_shard_spec, item_from_raw
from moco_mm.search.encoder import Encoder, SearchError
from moco_mm.search.export import ExportError
from moco_mm.search.thumbs import THUMB_SIDE, ThumbWriter, thumbnail_jpeg

log = logging.getLogger(__name__)

EMBED_FORMAT = "moco_mm.embeddings/1"
EMBED_INFO = "embed.json"
PARTS_DIR = "parts"
DTYPES = ("float16", "float32")
# embed.json keys a restart must match (besides the model fingerprint, checked first).
_FIXED = ("format", "embed_dim", "dtype", "captions", "thumb_side", "shards")


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shard positions rank `rank` owns: i with i % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(range(rank, n_shards, world_size))


def _write_atomic(path: Path, text: str) -> None:
    """tmp file + fsync + os.replace: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def read_marker(path: Path) -> dict | None:
    """A part's `.done` marker, or None when absent or unreadable (the part is redone)."""
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "images" in marker else None


@dataclass
class EmbedReport:
    out: Path
    rank: int
    world_size: int
    parts_embedded: list[int] = field(default_factory=list)  # by this call
    parts_already_done: list[int] = field(default_factory=list)  # had a marker: skipped
    images: int = 0
    captions: int = 0
    skipped: list[dict] = field(default_factory=list)  # corrupt samples of the parts embedded now
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def embed_settings(encoder: Encoder, data: str, urls: list[str], *, captions: bool, dtype: str,
                   thumb_side: int) -> dict:
    """What embed.json records (identical on every rank)."""
    return {"format": EMBED_FORMAT, "export": str(encoder.root.resolve()) if encoder.root else None,
            "model_fingerprint": encoder.fingerprint, "embed_dim": encoder.embed_dim, "dtype": dtype,
            "captions": captions, "thumb_side": thumb_side, "data": str(data), "shards": list(urls)}


def check_or_write_settings(out: Path, want: dict) -> None:
    """First run: write embed.json. Restart: refuse anything that would mix incomparable parts."""
    path = out / EMBED_INFO
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(want, indent=1))  # every rank writes the same bytes
        return
    except (OSError, ValueError) as e:
        raise SearchError(f"{path}: unreadable ({e}); embed into a new --out") from None
    if have.get("model_fingerprint") != want["model_fingerprint"]:
        raise SearchError(
            f"--out {out} holds embeddings of export {have.get('export')} (model fingerprint "
            f"{have.get('model_fingerprint')}); --export {want['export']} has fingerprint "
            f"{want['model_fingerprint']}: vectors of two models cannot share an index. Use the same export "
            f"to resume, or a new --out")
    for key in _FIXED:
        if have.get(key) != want[key]:
            what = ("the shard list (--data)" if key == "shards" else f"{key}")
            raise SearchError(f"--out {out} was started with {what} = {_short(have.get(key))}; this run asks for "
                              f"{_short(want[key])}: resume with the same options, or use a new --out")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 120 else s[:117] + "..."


def _prefetch(items: Iterable, fn: Callable, pool: ThreadPoolExecutor | None, window: int) -> Iterator:
    """fn(item) for every item, in order; with a pool, up to `window` run ahead in threads."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _PartEmbedder:
    """Embeds one shard into one part directory (the caller renames it and marks it)."""

    def __init__(self, encoder: Encoder, *, captions: bool, dtype: str, bf16: bool, batch_size: int,
                 text_batch_size: int, thumb_side: int, pool: ThreadPoolExecutor | None, bar: Any):
        self.encoder, self.captions, self.dtype, self.bf16 = encoder, captions, np.dtype(dtype), bf16
        self.batch_size, self.text_batch_size, self.thumb_side = batch_size, text_batch_size, thumb_side
        self.pool, self.bar = pool, bar

    def _autocast(self):
        return torch.autocast(self.encoder.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _unit(self, x: torch.Tensor) -> np.ndarray:
        # bf16 rows are not exactly unit: renormalise in float32 before storing
        return torch.nn.functional.normalize(x.float(), dim=-1).numpy().astype(self.dtype)

    def _prepare(self, raw) -> tuple[Item | None, torch.Tensor | None, bytes, dict | None]:
        """decode + eval transform + thumbnail (in a worker thread)."""
        try:
            item = item_from_raw(raw, raw.url)
            return item, self.encoder.transform(item.image), thumbnail_jpeg(item.image, self.thumb_side), None
        except Exception as e:  # a corrupt sample is skipped and counted, never fatal
            return None, None, b"", {"source": f"{raw.url}:{raw.key}", "reason": str(e)}

    def run(self, url: str, count: int | None, tmp: Path) -> dict:
        t0 = time.perf_counter()
        skipped: list[dict] = []
        metas: list[dict] = []
        vectors: list[np.ndarray] = []
        thumbs = ThumbWriter(self.thumb_side)
        batch: list[torch.Tensor] = []

        def flush() -> None:
            with self._autocast():
                feats = self.encoder.image_features(self.encoder.normalize(torch.stack(batch)))
            vectors.append(self._unit(feats))
            if self.bar is not None:
                self.bar.update(len(batch))
            batch.clear()

        def on_error(u: str, e: BaseException) -> None:
            log.warning("shard %s ended early: %s", u, e)
            skipped.append({"source": u, "reason": f"shard ended early: {e}"})

        raws = iter_raw_samples(url, on_error, count)
        for item, pixels, jpeg, bad in _prefetch(raws, self._prepare, self.pool, 4 * self.batch_size):
            if bad is not None:
                skipped.append(bad)
                if len(skipped) <= 3:
                    log.warning("skipped a corrupt sample: %s: %s", bad["source"], bad["reason"])
                continue
            metas.append({"id": item.id, "source": item.source, "captions": item.captions})
            thumbs.add_bytes(jpeg)
            batch.append(pixels)
            if len(batch) == self.batch_size:
                flush()
        if batch:
            flush()
        dim = self.encoder.embed_dim
        images = np.concatenate(vectors) if vectors else np.zeros((0, dim), self.dtype)
        np.save(tmp / "images.npy", images)
        with open(tmp / "images.jsonl", "w", encoding="utf-8") as f:
            for m in metas:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
        thumbs.write(tmp)
        n_captions = 0
        if self.captions:
            texts = [c for m in metas for c in m["captions"]]
            caps = []
            for i in range(0, len(texts), self.text_batch_size):
                with self._autocast():
                    caps.append(self._unit(self.encoder.text_features(
                        *self.encoder.tokenize(texts[i:i + self.text_batch_size]))))
            np.save(tmp / "captions.npy", np.concatenate(caps) if caps else np.zeros((0, dim), self.dtype))
            n_captions = len(texts)
        return {"images": len(metas), "captions": n_captions, "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 3)}


def embed_corpus(encoder: Encoder, data: str | os.PathLike, out: str | os.PathLike, *, captions: bool = False,
                 dtype: str = "float16", bf16: bool = False, batch_size: int = 64, text_batch_size: int = 256,
                 workers: int = 2, thumb_side: int = THUMB_SIDE, rank: int = 0, world_size: int = 1,
                 progress: bool = False, progress_position: int = 0,
                 say: Callable[[str], None] | None = None) -> EmbedReport:
    """Embed the shards of `data` that `rank` owns (i % world_size == rank) into `out`,
    one part per shard; parts with a `.done` marker are skipped. See the module docstring."""
    say = say or (lambda s: None)
    if dtype not in DTYPES:
        raise SearchError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if batch_size < 1 or text_batch_size < 1 or workers < 0:
        raise SearchError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    data = str(data)
    if not _is_shard_spec(data):
        raise SearchError(f"--data {data}: distributed embedding reads shards (a manifest, shard folder or "
                          f"pattern); turn a folder or table into shards with `moco-mm make-shards`, or index "
                          f"it in one process with `moco-mm search index`")
    source = ShardSource.from_spec(data)
    out = Path(out)
    check_or_write_settings(out, embed_settings(encoder, data, source.urls, captions=captions, dtype=dtype,
                                                thumb_side=thumb_side))
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    counts = source.counts or (None,) * len(source.urls)
    report = EmbedReport(out, rank, world_size)
    todo = []
    for i in shards_of_rank(len(source.urls), rank, world_size):
        marker = read_marker(parts / f"{part_name(i)}.done")
        if marker is not None and (parts / part_name(i)).is_dir():
            if marker.get("model_fingerprint") != encoder.fingerprint:
                raise SearchError(f"{parts / part_name(i)}.done: embedded by another model "
                                  f"({marker.get('model_fingerprint')}); use a new --out")
            report.parts_already_done.append(i)
        else:
            todo.append(i)
    if report.parts_already_done:
        say(f"skipping {len(report.parts_already_done)} of {len(report.parts_already_done) + len(todo)} parts "
            f"already done (their .done marker is there)")
    total = sum(counts[i] for i in todo) if all(counts[i] is not None for i in todo) else None
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", unit_scale=True, position=progress_position, dynamic_ncols=True,
                   desc=f"rank {rank}/{world_size}" if world_size > 1 else "embedding", leave=True)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="embed-prep") if workers > 0 else None
    embedder = _PartEmbedder(encoder, captions=captions, dtype=dtype, bf16=bf16, batch_size=batch_size,
                             text_batch_size=text_batch_size, thumb_side=thumb_side, pool=pool, bar=bar)
    t0 = time.perf_counter()
    try:
        for n, i in enumerate(todo):
            name = part_name(i)
            final, marker_path = parts / name, parts / f"{name}.done"
            marker_path.unlink(missing_ok=True)  # unreadable, or its folder is gone: redo
            for stale in parts.glob(f"{name}.tmp-*"):  # a killed run's half part
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp = parts / f"{name}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                stats = embedder.run(source.urls[i], counts[i], tmp)
                _fsync_dir_files(tmp)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            marker = {"part": i, "shard": source.urls[i], "rank": rank, "world_size": world_size,
                      "model_fingerprint": encoder.fingerprint, "dtype": dtype, **stats,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            _write_atomic(marker_path, json.dumps(marker, indent=1))  # LAST: now the part counts
            report.parts_embedded.append(i)
            report.images += stats["images"]
            report.captions += stats["captions"]
            report.skipped += stats["skipped"]
            if bar is not None:
                bar.set_postfix_str(f"parts {n + 1}/{len(todo)}, skipped samples {len(report.skipped)}")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def parts_status(out: Path) -> tuple[int, int]:
    """(parts with a marker, parts in the shard list) of an embedding directory."""
    info = json.loads((out / EMBED_INFO).read_text(encoding="utf-8"))
    n = len(info["shards"])
    done = sum(read_marker(out / PARTS_DIR / f"{part_name(i)}.done") is not None for i in range(n))
    return done, n


# -- the read side: what build-index streams ------------------------------------------------------


@dataclass
class EmbeddedPart:
    index: int
    dir: Path
    marker: dict

    @property
    def n_images(self) -> int:
        return int(self.marker["images"])

    @property
    def n_captions(self) -> int:
        return int(self.marker.get("captions", 0))

    def vectors(self, kind: str) -> np.ndarray:
        """[n, D] memory-mapped (nothing is read until sliced)."""
        return np.load(self.dir / f"{kind}.npy", mmap_mode="r")


class Embeddings:
    """An embedding directory, every part checked against its marker and embed.json."""

    def __init__(self, root: Path, info: dict, parts: list[EmbeddedPart]):
        self.root, self.info, self.parts = root, info, parts
        self.dim = int(info["embed_dim"])
        self.has_captions = bool(info["captions"])
        self._starts = {kind: np.cumsum([0] + [self._count(p, kind) for p in parts]) for kind in ("images", "captions")}

    @staticmethod
    def _count(part: EmbeddedPart, kind: str) -> int:
        return part.n_images if kind == "images" else part.n_captions

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Embeddings":
        root = Path(root)
        try:
            info = json.loads((root / EMBED_INFO).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SearchError(f"--emb {root}: no {EMBED_INFO}: not an embedding directory (moco-mm embed)") from None
        except (OSError, ValueError) as e:
            raise SearchError(f"{root / EMBED_INFO}: unreadable: {e}") from None
        if info.get("format") != EMBED_FORMAT:
            raise SearchError(f"{root / EMBED_INFO}: not a {EMBED_FORMAT} directory")
        parts, missing = [], []
        for i in range(len(info["shards"])):
            marker = read_marker(root / PARTS_DIR / f"{part_name(i)}.done")
            if marker is None or not (root / PARTS_DIR / part_name(i)).is_dir():
                missing.append(i)
                continue
            part = EmbeddedPart(i, root / PARTS_DIR / part_name(i), marker)
            if marker.get("model_fingerprint") != info["model_fingerprint"]:
                raise SearchError(f"{part.dir}: embedded by another model than {EMBED_INFO} names")
            kinds = ("images", "captions") if info["captions"] else ("images",)
            for kind in kinds:
                try:
                    v = part.vectors(kind)
                except (OSError, ValueError) as e:
                    raise SearchError(f"{part.dir / kind}.npy: unreadable ({e}): delete {part.dir}.done and "
                                      f"rerun moco-mm embed") from None
                want = (cls._count(part, kind), int(info["embed_dim"]))
                if v.shape != want or v.dtype != np.dtype(info["dtype"]):
                    raise SearchError(f"{part.dir / kind}.npy: {v.dtype} {v.shape}, its marker says {info['dtype']} "
                                      f"{want}: delete {part.dir}.done and rerun moco-mm embed")
            parts.append(part)
        if missing:
            raise SearchError(f"--emb {root}: {len(missing)} of {len(info['shards'])} parts are not finished "
                              f"(e.g. {part_name(missing[0])}): rerun the same `moco-mm embed` command to finish them")
        return cls(root, info, parts)

    def count(self, kind: str) -> int:
        return int(self._starts[kind][-1])

    def skipped(self) -> list[dict]:
        return [s for p in self.parts for s in p.marker.get("skipped", [])]

    def iter_chunks(self, kind: str, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, float32 [<= rows, D]) over every vector of `kind`, part by part:
        at most one chunk is in memory."""
        for p, start in zip(self.parts, self._starts[kind]):
            v = p.vectors(kind)
            for s in range(0, len(v), rows):
                yield int(start) + s, np.ascontiguousarray(v[s:s + rows], dtype=np.float32)

    def rows(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), D]: the vectors at global rows `ids` (any order), read by part."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        starts = self._starts[kind]
        which = np.searchsorted(starts, ids, side="right") - 1
        for j in np.unique(which):
            sel = np.nonzero(which == j)[0]
            local = ids[sel] - starts[j]
            order = np.argsort(local)
            v = self.parts[j].vectors(kind)
            out[sel[order]] = v[local[order]]
        return out


# -- the program ----------------------------------------------------------------------------------

USAGE = """Embed a shard set with an exported encoder, one part per shard, resumable, on any number of ranks.

    torchrun --nproc_per_node=N -m moco_mm.embed --export EXPORT --data SHARDS --out EMB_DIR [--captions]
    python -m moco_mm.embed --export EXPORT --data SHARDS --out EMB_DIR     # one process
    moco-mm embed --export EXPORT --data SHARDS --out EMB_DIR [--captions] [--dtype float16|float32] [--bf16]
    moco-mm search build-index --emb EMB_DIR --out INDEX_DIR --max-ram 2GB    # next: a FAISS index

Shard i goes to rank i % WORLD_SIZE (torchrun's or SLURM's environment; no process group
is formed, ranks never wait on each other). Each rank embeds on CUDA (device LOCAL_RANK)
when present, else the CPU, and writes EMB_DIR/parts/part-NNNNNN/ (images.npy, images.jsonl,
thumbnails, captions.npy with --captions) then its part-NNNNNN.done marker, last. Rerun the
same command after a crash or preemption: marked parts are skipped, the rest redone. A rerun
with another export, dtype, --captions or shard list is refused. Corrupt samples are skipped,
counted and listed in the markers. Each rank shows its own progress bar (samples/s) and a
summary line; rank 0 ends with the parts finished so far. Exit status 0 on success, 2 on an
error."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm embed", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (moco-mm export)")
    ap.add_argument("--data", required=True, help="shard spec: manifest.json, shard folder, brace pattern")
    ap.add_argument("--out", required=True, help="embedding directory (created; resumed when it exists)")
    ap.add_argument("--captions", action="store_true", help="also embed every caption (image->caption search)")
    ap.add_argument("--dtype", choices=DTYPES, default="float16", help="stored vector type (default float16)")
    ap.add_argument("--bf16", action="store_true", help="run the towers under bf16 autocast (GPUs)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: CUDA device LOCAL_RANK when available, else the CPU")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward")
    ap.add_argument("--text-batch-size", type=int, default=256, help="captions per forward")
    ap.add_argument("--workers", type=int, default=4,
                    help="threads decoding, transforming and thumbnailing images (0: in the main thread)")
    ap.add_argument("--thumb-side", type=int, default=THUMB_SIDE, help="thumbnail longer side, pixels")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from moco_mm.distributed import launcher_info

    try:
        dist = launcher_info(args.device)
    except RuntimeError:
        print("embed: error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    tag = f"[rank {dist.rank}/{dist.world_size}] " if dist.world_size > 1 else ""

    def say(s: str) -> None:
        print(f"embed: {tag}{s}", file=sys.stderr, flush=True)

    try:
        encoder = Encoder.from_export(args.export, device=dist.device)
        report = embed_corpus(encoder, args.data, args.out, captions=args.captions, dtype=args.dtype,
                              bf16=args.bf16, batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                              workers=args.workers, thumb_side=args.thumb_side, rank=dist.rank,
                              world_size=dist.world_size, progress=not args.no_progress,
                              progress_position=dist.local_rank, say=say)
    except (SearchError, ExportError, DataError, ValueError, OSError) as e:
        print(f"embed: error: {tag}{e}", file=sys.stderr)
        return 2
    say(f"embedded {len(report.parts_embedded)} parts on {dist.device}: {report.images} images"
        + (f", {report.captions} captions" if args.captions else "")
        + f", {len(report.skipped)} corrupt samples skipped, in {report.seconds:.1f}s "
          f"({report.images_per_s:.1f} images/s); {len(report.parts_already_done)} parts were already done")
    if report.skipped:
        first = report.skipped[0]
        say(f"first skipped sample: {first['source']}: {first['reason']} (all are listed in the .done markers)")
    if dist.rank == 0:
        done, total = parts_status(Path(args.out))
        say(f"{done} of {total} parts finished in {args.out}" + (
            f"; next: moco-mm search build-index --emb {args.out} --out INDEX_DIR --max-ram 2GB" if done == total
            else " (other ranks may still be working; rerun the command to finish any that failed)"))
    return 0
