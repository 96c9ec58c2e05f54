"""Raw image-caption pairs -> webdataset shards (`moco-mm make-shards`).

Inputs (`read_rows`):
  * CSV / TSV with a header holding `image` and `caption` columns and optionally `group`
    (other columns ignored);
  * JSONL, one object per line with `image`, `caption` (a string or a list of strings) and
    optionally `group` (a string or an integer; any other type skips the row with a reason);
  * a folder of images (searched recursively) with a same-stem `.txt` next to each image;
    every non-empty line of the `.txt` is one caption (no groups).
A group names what makes pairs duplicates of each other beyond their content, e.g. the
search query behind a click: the model never uses a pair as a negative of a pair of the same
group. Group values are kept exactly as written (a CSV cell is a string); an empty cell, an
empty string, a JSON null or no field at all means "no group".
Image paths are relative to the input file's folder (or to the folder itself); absolute
paths are used as they are. One image may be named by several rows (COCO-style files list
each image once per caption); `plan_samples` merges them into one sample (see Invariants).

Output (`write_shards`), in `out_dir`:
  * `shard-000000.tar`, `shard-000001.tar`, ... in webdataset layout: for every sample the
    members `KEY.jpg|png|webp` (RGB), `KEY.txt` (the first caption, UTF-8) and `KEY.json`,
    with KEY = the zero-padded sample_id:
        {"sample_id": int, "captions": [str, ...], "source": str, "width": int, "height": int,
         "image_fp": int,          # fingerprints.image_fingerprint of the stored RGB pixels
         "group": str | int}       # only when the sample has a group
    (keys sorted, UTF-8); `image_fp` equals image_fingerprint(to_rgb(decode_image(stored
    bytes))), also when the image was re-encoded as JPEG (it is then taken from the JPEG's
    decoded pixels), so files with the same pixels in different encodings agree;
  * `manifest.json` (written last): `shards` (file names), `shard_samples` (samples per
    shard, what the loader plans epochs with), `shard_bytes`, `samples`, `rows` (input
    rows), `merged_rows` (rows folded into an earlier row's sample), `skipped`,
    `skipped_rows` (`row`, `sample_id`, `source`, `reason` for each, in row order),
    `id_offset`, options. Every input row is counted once: rows = samples + merged_rows + skipped.

Invariants:
  * sample_id = id_offset + the row's position in the input (0-based; data rows of a CSV,
    non-blank lines of a JSONL, images of a folder in sorted path order). It never depends
    on the worker count or on which worker finished first; skipped and merged rows leave gaps.
  * One sample per image. A row is first checked on its own (parse error, empty image path,
    no non-empty caption, unreadable caption file); a row that fails is skipped by itself.
    The remaining rows are grouped by resolved image path (`os.path.realpath` of the path
    joined to its base, so a relative and an absolute path, or a symlink, naming one file are
    one image; the rows need not be adjacent). They become one sample with the sample_id
    and `source` of their first row, the captions of all of them in input order, exact
    duplicate captions dropped (first kept), and the `group` of the first of them that has
    one (the groups of later rows are dropped: a sample carries one group). The other rows
    count as `merged_rows`. If the image itself is bad, every row naming it is skipped and
    recorded with the image's reason.
  * Samples are written in increasing sample_id order. Shard contents and order are a pure
    function of (rows, options): workers return results in input order, tar headers carry
    fixed metadata (mtime 0, uid 0), so the same input gives byte-identical shards.
  * Every image is decoded fully once. A bad row (missing or empty file, not an image,
    truncated image, unreadable or empty caption, malformed input line) is skipped and
    recorded with its reason; it never stops the run.
  * Grouping holds every row's path and captions in memory (caption files are read while
    planning, in this process), never a decoded image; images are read and encoded by the
    workers, one sample at a time.
  * Stored images are 8-bit RGB: CMYK, 16-bit, greyscale, palette and alpha images are
    converted (alpha is composited on white). An image that needs no change (RGB JPEG, PNG
    or WebP, upright, within `max_size`) keeps its original bytes; others are re-encoded
    (PNG for lossless sources, JPEG otherwise).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from moco_mm.data.fingerprints import image_fingerprint

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
MANIFEST_FORMAT = "moco_mm.shards/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats stored as they are when the image needs no conversion.
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Lossless sources are re-encoded losslessly.
_LOSSLESS_FORMATS = {"PNG", "GIF", "BMP", "TIFF", "PPM", "TGA"}
# The keys write_shards itself writes into manifest.json.
_MANIFEST_KEYS = frozenset({"format", "input", "shards", "shard_samples", "shard_bytes", "samples", "rows",
                            "merged_rows", "skipped", "skipped_rows", "id_offset", "options"})
# tarfile pads the archive to a multiple of this; counted when budgeting max_shard_bytes.
_TAR_TAIL = tarfile.RECORDSIZE


class InputError(ValueError):
    """The input as a whole cannot be read (missing file, no usable header). Names the file."""


class ImageError(ValueError):
    """One image cannot be used; the message is the skip reason."""


@dataclass(frozen=True)
class Row:
    """One input record, before its image is looked at.

    `index` is the position in the input; `image` is the path as written there (recorded as
    `source`); `base` is the folder it is relative to. Captions come either inline
    (`captions`) or from `caption_file` (folder input). `group` is the row's group (None:
    none). `error` is a problem already found while parsing the input (the row will be
    skipped with that reason).
    """

    index: int
    image: str
    base: str
    captions: tuple[str, ...] | None = None
    caption_file: str | None = None
    error: str | None = None
    group: str | int | None = None


@dataclass(frozen=True)
class Encoded:
    """A good sample, ready to write: `ext` is jpg/png/webp, `image` the encoded RGB bytes,
    `image_fp` the image_fingerprint of the pixels those bytes decode to, `group` or None."""

    index: int
    sample_id: int
    ext: str
    image: bytes
    captions: tuple[str, ...]
    source: str
    width: int
    height: int
    image_fp: int
    group: str | int | None = None


@dataclass(frozen=True)
class Skipped:
    index: int
    sample_id: int
    source: str
    reason: str


@dataclass(frozen=True)
class Planned:
    """One sample to encode: all usable rows naming one image (`plan_samples`).

    `index`/`sample_id`/`source` come from the first of those rows; `rows` holds
    (index, source) of every one, first included; `path` is the image file to open;
    `captions` are the merged captions (input order, duplicates dropped); `group` is the
    group of the first of those rows that has one (None: none has).
    """

    index: int
    sample_id: int
    path: str
    source: str
    captions: tuple[str, ...]
    rows: tuple[tuple[int, str], ...]
    group: str | int | None = None


# ---------------------------------------------------------------------------------------
# Reading inputs
# ---------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """Parse a CSV/TSV, JSONL or folder input into rows (no image is opened here)."""
    p = Path(path)
    if p.is_dir():
        return _rows_from_folder(p)
    if not p.is_file():
        raise InputError(f"{p}: no such input file or folder")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _rows_from_csv(p, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _rows_from_jsonl(p)
    hint = ("; a Karpathy-split dataset_coco.json / dataset_flickr30k.json needs --format coco-karpathy or "
            "flickr30k-karpathy (moco_mm.data.karpathy)") if suffix == ".json" else ""
    raise InputError(f"{p}: unknown input kind {suffix!r}; expected .csv, .tsv, .jsonl or a folder{hint}")


def _rows_from_csv(path: Path, delimiter: str) -> list[Row]:
    base = str(path.parent)
    # surrogateescape: a row with invalid UTF-8 is skipped on its own instead of failing the file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in ("image", "caption") if c not in header]
        if missing:
            raise InputError(f"{path}: header must name the columns 'image' and 'caption'; "
                             f"missing {missing}, header is {header}")
        rows = []
        for index, rec in enumerate(reader):
            image = rec.get("image") or ""
            caption = rec.get("caption")
            # No `group` column, an empty cell or a short row: no group (a CSV cannot say null).
            group = rec.get("group") or None
            error = None
            if caption is None:
                error = "row has fewer fields than the header (no caption)"
            elif _has_surrogates(caption) or _has_surrogates(image):
                error = "caption or image path is not valid UTF-8"
            elif group is not None and _has_surrogates(group):
                error = "group is not valid UTF-8"
            rows.append(Row(index, image, base, captions=(caption or "",), error=error, group=group))
    return rows


def _rows_from_jsonl(path: Path) -> list[Row]:
    base = str(path.parent)
    rows = []
    index = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rows.append(_parse_jsonl_line(raw, index, lineno, base))
            index += 1
    return rows


def _parse_jsonl_line(raw: bytes, index: int, lineno: int, base: str) -> Row:
    where = f"line {lineno}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Row(index, "", base, error=f"{where}: not valid UTF-8")
    except json.JSONDecodeError as e:
        return Row(index, "", base, error=f"{where}: invalid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return Row(index, "", base, error=f"{where}: expected a JSON object")
    image = obj.get("image")
    if not isinstance(image, str):
        return Row(index, "", base, error=f"{where}: 'image' must be a string path")
    caption = obj.get("caption")
    if isinstance(caption, str):
        captions: tuple[str, ...] = (caption,)
    elif isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        captions = tuple(caption)
    else:
        return Row(index, image, base, error=f"{where}: 'caption' must be a string or a list of strings")
    group = obj.get("group")
    if isinstance(group, bool) or not isinstance(group, (str, int, type(None))):
        return Row(index, image, base, error=f"{where}: 'group' must be a string or an integer, "
                                             f"got {type(group).__name__} {json.dumps(group)[:40]}")
    # A JSON "\ud800" escape decodes to a lone surrogate, which cannot be written as UTF-8.
    if any(_has_surrogates(s) for s in (image, *captions, group if isinstance(group, str) else "")):
        return Row(index, image, base, error=f"{where}: caption, image path or group is not valid "
                                             f"UTF-8 (lone surrogate escape)")
    return Row(index, image, base, captions=captions, group=group if group != "" else None)


def _rows_from_folder(folder: Path) -> list[Row]:
    images = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    rows = []
    for index, p in enumerate(images):
        rel = p.relative_to(folder).as_posix()
        rows.append(Row(index, rel, str(folder), caption_file=str(p.with_suffix(".txt"))))
    return rows


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------
# Rows -> planned samples (this process) -> encoded samples (the worker processes)
# ---------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. Alpha is composited on white; 16/32-bit is rescaled.

    PIL's own `convert("RGB")` clips 16-bit values at 255 (an almost white image), so
    high-bit-depth greyscale is scaled here first.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr * 255.0 if float(arr.max(initial=0.0)) <= 1.0 else arr
        elif mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
            arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode `data` (truncation shows up here, not later). Raises ImageError."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, zlib/struct errors, ...
        raise ImageError(f"truncated or corrupt image: {type(e).__name__}: {e}") from None
    return img


class PreparedImage(NamedTuple):
    """What `prepare_image` returns: the stored encoding (ext jpg/png/webp, its bytes), its
    size and `image_fp`, the image_fingerprint of the RGB pixels `data` decodes to."""

    ext: str
    data: bytes
    width: int
    height: int
    image_fp: int


def prepare_image(data: bytes, *, max_size: int = 0, jpeg_quality: int = 95) -> PreparedImage:
    """Decode, make upright RGB, shrink the long side to `max_size` (0: keep).

    The original bytes are kept when nothing changed. `image_fp` is fingerprinted from
    pixels decoded here anyway, except after a JPEG re-encode: the stored pixels are then
    not the ones in memory (lossy), so the JPEG is decoded once more, and `image_fp` is
    always the fingerprint of what a reader of the shard decodes.
    """
    img = decode_image(data)
    fmt = img.format or ""
    changed = False
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: store the upright pixels
        img = ImageOps.exif_transpose(img)
        changed = True
    try:
        rgb = to_rgb(img)
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot convert mode {img.mode} to RGB: {e}") from None
    changed = changed or rgb is not img
    if max_size and max(rgb.size) > max_size:
        scale = max_size / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        changed = True
    if not changed and fmt in _KEEP_FORMATS:
        return PreparedImage(_KEEP_FORMATS[fmt], data, rgb.width, rgb.height, image_fingerprint(rgb))
    out = io.BytesIO()
    if fmt in _LOSSLESS_FORMATS:
        rgb.save(out, format="PNG")
        return PreparedImage("png", out.getvalue(), rgb.width, rgb.height, image_fingerprint(rgb))
    rgb.save(out, format="JPEG", quality=jpeg_quality)
    stored = to_rgb(decode_image(out.getvalue()))
    return PreparedImage("jpg", out.getvalue(), rgb.width, rgb.height, image_fingerprint(stored))


def _row_captions(row: Row) -> tuple[str, ...]:
    if row.caption_file is not None:
        cap_path = Path(row.caption_file)
        if not cap_path.is_file():
            raise ImageError(f"missing caption file {cap_path.name}")
        try:
            text = cap_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ImageError(f"caption file {cap_path.name} is not valid UTF-8") from None
        except OSError as e:
            raise ImageError(f"caption file {cap_path.name} unreadable: {e}") from None
        candidates: Sequence[str] = text.splitlines()
    else:
        candidates = row.captions or ()
    captions = tuple(c.strip() for c in candidates if c.strip())
    if not captions:
        raise ImageError("empty caption")
    return captions


def plan_samples(rows: Sequence[Row], *, id_offset: int = 0) -> tuple[list[Planned], list[Skipped]]:
    """Check every row on its own, then merge the rows naming one image (module Invariants).

    Returns (samples in increasing sample_id order, rows skipped here in row order). No
    image is opened: a missing or bad image is found later, when its sample is encoded.
    """
    skipped: list[Skipped] = []
    # Resolved image path -> (row, its captions) of every usable row naming it. Dicts keep
    # insertion order, so groups come out in the order of their first row.
    groups: dict[str, list[tuple[Row, tuple[str, ...]]]] = {}
    resolved: dict[tuple[str, str], str] = {}  # realpath costs syscalls; COCO repeats each path 5x
    for row in rows:
        try:
            if row.error:
                raise ImageError(row.error)
            captions = _row_captions(row)
            if not row.image:
                raise ImageError("empty image path")
            key = resolved.get((row.base, row.image))
            if key is None:
                try:
                    key = os.path.realpath(os.path.join(row.base, row.image))
                except (OSError, ValueError) as e:  # e.g. a NUL byte in the path
                    raise ImageError(f"bad image path: {e}") from None
                resolved[(row.base, row.image)] = key
        except ImageError as e:
            skipped.append(Skipped(row.index, id_offset + row.index, row.image, str(e)))
            continue
        except Exception as e:  # a bad row must never stop a long run; the reason is recorded
            skipped.append(Skipped(row.index, id_offset + row.index, row.image,
                                   f"unexpected {type(e).__name__}: {e}"))
            continue
        groups.setdefault(key, []).append((row, captions))
    plans = []
    for members in groups.values():
        first = members[0][0]
        # dict.fromkeys keeps the first occurrence of each caption, in input order.
        captions = tuple(dict.fromkeys(c for _, caps in members for c in caps))
        group = next((r.group for r, _ in members if r.group is not None), None)
        plans.append(Planned(first.index, id_offset + first.index, os.path.join(first.base, first.image),
                             first.image, captions, tuple((r.index, r.image) for r, _ in members), group))
    return plans, skipped


def encode_sample(plan: Planned, *, max_size: int = 0, jpeg_quality: int = 95) -> Encoded | Skipped:
    """Read and encode one planned sample's image. Never raises for a bad image: returns
    `Skipped` for the plan's first row (the caller records every row of the plan)."""
    try:
        path = Path(plan.path)
        if not path.is_file():
            raise ImageError(f"missing file {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"unreadable file {path}: {e}") from None
        prepared = prepare_image(data, max_size=max_size, jpeg_quality=jpeg_quality)
    except ImageError as e:
        return Skipped(plan.index, plan.sample_id, plan.source, str(e))
    except Exception as e:  # a bad image must never stop a long run; the reason is recorded
        return Skipped(plan.index, plan.sample_id, plan.source, f"unexpected {type(e).__name__}: {e}")
    return Encoded(plan.index, plan.sample_id, prepared.ext, prepared.data, plan.captions, plan.source,
                   prepared.width, prepared.height, prepared.image_fp, plan.group)


# ---------------------------------------------------------------------------------------
# Writing tars
# ---------------------------------------------------------------------------------------


def sample_key(sample_id: int) -> str:
    """The tar member prefix of a sample: zero-padded, no dots (webdataset splits on the first)."""
    return f"{sample_id:010d}"


def sample_members(s: Encoded) -> list[tuple[str, bytes]]:
    key = sample_key(s.sample_id)
    meta = {"sample_id": s.sample_id, "captions": list(s.captions), "source": s.source,
            "width": s.width, "height": s.height, "image_fp": s.image_fp}
    if s.group is not None:
        meta["group"] = s.group
    return [
        (f"{key}.{s.ext}", s.image),
        (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
        (f"{key}.txt", s.captions[0].encode("utf-8")),
    ]


def _member_bytes(data_len: int) -> int:
    return tarfile.BLOCKSIZE + math.ceil(data_len / tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file with fixed metadata (reproducible bytes)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Cuts a sample stream into `shard-NNNNNN.tar` files.

    A new shard starts when the current one holds `samples_per_shard` samples (0: no limit)
    or when the next sample would push it past `max_shard_bytes` (0: no limit); a single
    sample bigger than the byte limit gets a shard of its own. Each shard is written as
    `.tmp` and renamed when complete.
    """

    def __init__(self, out_dir: Path, *, samples_per_shard: int = 1000, max_shard_bytes: int = 0):
        if samples_per_shard < 0 or max_shard_bytes < 0:
            raise ValueError("samples_per_shard and max_shard_bytes must be >= 0")
        if samples_per_shard == 0 and max_shard_bytes == 0:
            raise ValueError("set samples_per_shard and/or max_shard_bytes")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.names: list[str] = []
        self.counts: list[int] = []
        self.sizes: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0

    def add(self, sample: Encoded) -> None:
        members = sample_members(sample)
        size = sum(_member_bytes(len(d)) for _, d in members)
        if self._tar is not None and (
            (self.samples_per_shard and self._count >= self.samples_per_shard)
            or (self.max_shard_bytes and self._bytes + size + _TAR_TAIL > self.max_shard_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._start()
        assert self._tar is not None
        for name, data in members:
            add_member(self._tar, name, data)
        self._count += 1
        self._bytes += size

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def _start(self) -> None:
        name = SHARD_PATTERN.format(len(self.names))
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.names.append(name)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self.out_dir / self.names[-1]
        os.replace(self._tmp, final)
        self.counts.append(self._count)
        self.sizes.append(final.stat().st_size)
        self._tar = None


def _results(plans: Sequence[Planned], encode, workers: int) -> Iterator[Encoded | Skipped]:
    """Encoded samples in plan order, whatever the worker count."""
    if workers <= 0:
        yield from map(encode, plans)
        return
    # spawn: children start clean (no inherited threads or torch state); imap keeps order.
    ctx = multiprocessing.get_context("spawn")
    chunksize = max(1, min(64, len(plans) // (workers * 8) or 1))
    with ctx.Pool(workers) as pool:
        yield from pool.imap(encode, plans, chunksize=chunksize)


def _clear_outputs(out_dir: Path, overwrite: bool) -> None:
    old = sorted(out_dir.glob("shard-*.tar")) + sorted(out_dir.glob("shard-*.tar.tmp"))
    manifest = out_dir / MANIFEST
    if manifest.exists():
        old.append(manifest)
    if old and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds shards or a manifest ({old[0].name}, ...); "
                              f"pass overwrite=True (--overwrite) to replace them")
    for p in old:
        p.unlink()


def write_shards(
    rows: Sequence[Row],
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 0,
    max_size: int = 0,
    jpeg_quality: int = 95,
    workers: int = 0,
    id_offset: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    input_label: str = "",
    manifest_extra: dict | None = None,
) -> dict:
    """Merge `rows` by image (`plan_samples`), encode the images (in `workers` processes;
    0: in this process) and write shards + manifest.

    Returns the manifest (also written to `out_dir/manifest.json`, last, atomically).
    `input_label` is recorded as the manifest's `input` (keep it free of temporary paths
    when byte-identical manifests matter). `manifest_extra` adds keys to the manifest (a
    format reader's metadata, e.g. karpathy.py's `karpathy` and `eval_protocol`); it may not
    replace the keys written here.
    """
    if id_offset < 0:
        raise ValueError(f"id_offset must be >= 0, got {id_offset}")
    clash = sorted(set(manifest_extra or ()) & _MANIFEST_KEYS)
    if clash:
        raise ValueError(f"manifest_extra may not replace the manifest's own keys {clash}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out, overwrite)
    plans, row_skips = plan_samples(rows, id_offset=id_offset)
    skipped = [_skip_record(s.index, s.sample_id, s.source, s.reason) for s in row_skips]
    merged = 0
    encode = functools.partial(encode_sample, max_size=max_size, jpeg_quality=jpeg_quality)
    writer = ShardWriter(out, samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes)
    bar = _progress(len(plans), progress)
    try:
        for plan, result in zip(plans, _results(plans, encode, workers)):
            if isinstance(result, Skipped):
                # A bad image skips every row that names it, each recorded under its own id.
                skipped += [_skip_record(index, id_offset + index, source, result.reason)
                            for index, source in plan.rows]
            else:
                writer.add(result)
                merged += len(plan.rows) - 1
            bar.update(1)
            bar.set_postfix(skipped=len(skipped), refresh=False)
    finally:
        bar.close()
        writer.close()
    skipped.sort(key=lambda r: r["row"])  # row-level and image-level skips interleave
    manifest = {
        "format": MANIFEST_FORMAT,
        "input": input_label,
        "shards": writer.names,
        "shard_samples": writer.counts,
        "shard_bytes": writer.sizes,
        "samples": sum(writer.counts),
        "rows": len(rows),
        "merged_rows": merged,
        "skipped": len(skipped),
        "skipped_rows": skipped,
        "id_offset": id_offset,
        "options": {"samples_per_shard": samples_per_shard, "max_shard_bytes": max_shard_bytes,
                    "max_size": max_size, "jpeg_quality": jpeg_quality},
    }
    manifest.update(manifest_extra or {})
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _skip_record(index: int, sample_id: int, source: str, reason: str) -> dict:
    return {"row": index, "sample_id": sample_id, "source": source, "reason": reason}


def make_shards(input_path: str | Path, out_dir: str | Path, **options) -> dict:
    """`read_rows(input_path)` then `write_shards(...)`; options as for `write_shards`."""
    rows = read_rows(input_path)
    options.setdefault("input_label", str(input_path))
    return write_shards(rows, out_dir, **options)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc="make_shards", dynamic_ncols=True)


def iter_shard_members(path: str | Path) -> Iterable[tuple[str, bytes]]:
    """(name, bytes) of every regular member of a local tar, in order (for tests and checks)."""
    with tarfile.open(path, "r:*") as tar:
        for info in tar:
            if info.isreg():
                f = tar.extractfile(info)
                assert f is not None
                yield info.name, f.read()
