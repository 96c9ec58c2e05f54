"""Labelled images for zero-shot classification: an image folder or shards -> batches of
(uint8 pixels, class index), checked against a classes file (moco_mm.metrics.read_classes).

    classes = read_classes("classes.txt")
    data = open_labeled("imagenet/val", classes)       # checks folders/labels against classes
    for batch in data.batches(transform, batch_size=64):
        batch["image"]      uint8 [b,3,S,S] (the eval transform, not normalised)
        batch["label"]      int64 [b], indices into classes.texts
    data.n_skipped                                     # unreadable images left out (this pass)

Two forms of `data`:
  * an image folder in torchvision ImageFolder layout: one sub-folder per class (its name is
    the label), images anywhere below it (.jpg .jpeg .png .webp .bmp .gif .tif .tiff).
    With a one-name-per-line classes file, line i names the i-th sub-folder in sorted
    order (torchvision's class index); with FOLDER<TAB>class name lines, each sub-folder is
    looked up by name. Sub-folders whose names start with '.' are ignored. Every sub-folder
    must be a class and every class needs a sub-folder holding images: checked before any
    image is read, the error naming the folder or the classes file's line.
  * shards (a manifest, a folder of tars, a brace pattern, pipe: URLs) whose samples carry a
    label as a `KEY.cls` member (the class index as text: webdataset's and CLIP_benchmark's
    convention) or as "label" in KEY.json (an integer index, or a FOLDER name of the
    FOLDER<TAB>class form). Captions are not needed. A sample without a usable label stops
    the stream with an error naming the shard and the sample.
Unreadable images are left out, counted and logged (the first few), as the loader does.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image, ImageOps

from moco_mm.data.make_shards import IMAGE_SUFFIXES, MANIFEST, ImageError, decode_image, to_rgb
from moco_mm.data.samples import IMAGE_EXTS, RawSample, iter_raw_samples
from moco_mm.data.shard_io import is_remote
from moco_mm.data.sources import DataError, ShardSource
from moco_mm.metrics import ClassList

__all__ = ["LabeledImages", "open_labeled", "load_image_file"]

log = logging.getLogger(__name__)

_LOGGED_BAD = 5  # unreadable images logged one by one; the rest only counted


def load_image_file(path: str | os.PathLike) -> Image.Image:
    """A file -> upright 8-bit RGB (EXIF orientation applied, as make_shards stores images).
    Raises ImageError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: unreadable: {e}") from None
    try:
        img = decode_image(data)
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except Exception as e:  # a malformed EXIF block, an odd mode
        raise ImageError(f"{path}: {type(e).__name__}: {e}") from None


def _is_image_folder(data: str) -> bool:
    p = Path(data)
    return p.is_dir() and not (p / MANIFEST).is_file() and not any(p.glob("*.tar"))


class LabeledImages:
    """Labelled images checked against `classes`; see the module docstring. `kind` is
    "folder" or "shards"; `total` the number of images (None for shards without counts)."""

    def __init__(self, data: str, classes: ClassList, *, files: list[tuple[Path, int]] | None = None,
                 source: ShardSource | None = None):
        self.data = data
        self.classes = classes
        self.files = files
        self.source = source
        self.kind = "folder" if files is not None else "shards"
        self._key_index = {k: i for i, k in enumerate(classes.keys)} if classes.keys else {}
        self.n_skipped = 0  # unreadable images left out by the last (or current) pass of `batches`

    @property
    def total(self) -> int | None:
        return len(self.files) if self.files is not None else self.source.total_samples

    def batches(self, transform: Callable[[Image.Image], torch.Tensor], batch_size: int = 64, *,
                workers: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
        """Every image once, in a fixed order (folder: class by class in label order, files
        sorted; shards: shard and tar order). `workers` > 0 decodes and transforms images in that
        many threads (the tars themselves are read in order on the calling thread).

        With world_size > 1, this rank's share only: image k (in that order, unreadable ones
        counted) belongs to rank (k // batch_size) % world_size, whole batches dealt out in
        turn, so a rank's batches are those one process would form. A rank whose share holds
        no readable image yields nothing (the caller checks the total over ranks)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = self._folder_items() if self.files is not None else self._shard_items()
        if world_size > 1:
            items = (item for k, item in enumerate(items) if (k // batch_size) % world_size == rank)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        yielded = 0
        self.n_skipped = 0
        first_bad: str | None = None

        def prepare(item: tuple[Callable[[], Image.Image], int, str]):
            load, label, name = item
            try:
                return transform(load()), label, name, None
            except ImageError as e:
                return None, label, name, str(e)

        pool = ThreadPoolExecutor(workers) if workers > 0 else None
        try:
            # A batch's worth of images at a time: bounded memory, whatever the data's size.
            for chunk in _chunks(items, batch_size):
                for pixels, label, name, problem in (pool.map(prepare, chunk) if pool else map(prepare, chunk)):
                    if pixels is None:
                        self.n_skipped += 1
                        first_bad = first_bad or problem
                        if self.n_skipped <= _LOGGED_BAD:
                            log.warning("skipped an unreadable image: %s", problem)
                        continue
                    images.append(pixels)
                    labels.append(label)
                    if len(images) == batch_size:
                        yielded += len(images)
                        yield _batch(images, labels)
                        images, labels = [], []
            if images:
                yielded += len(images)
                yield _batch(images, labels)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        if yielded == 0 and world_size == 1:
            raise DataError(f"{self.data}: no readable image" + (f", e.g. {first_bad}" if first_bad else ""))

    def _folder_items(self) -> Iterator[tuple[Callable[[], Image.Image], int, str]]:
        for path, label in self.files:
            yield (lambda p=path: load_image_file(p)), label, str(path)

    def _shard_items(self) -> Iterator[tuple[Callable[[], Image.Image], int, str]]:
        counts = self.source.counts or (None,) * len(self.source.urls)

        def on_error(url: str, exc: BaseException) -> None:
            log.warning("shard %s ended early: %s", url, exc)

        for url, count in zip(self.source.urls, counts):
            for raw in iter_raw_samples(url, on_error, count):
                name = f"{url}: sample {raw.key}"
                if raw.problem:
                    yield _failing(f"{name}: {raw.problem}"), 0, name
                    continue
                ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
                if ext is None:
                    yield _failing(f"{name}: no image member (expected KEY.{'/'.join(IMAGE_EXTS[:4])})"), 0, name
                    continue
                label = self._label(raw, name)  # a missing or bad label stops the stream
                yield (lambda b=raw.members[ext], n=f"{name}.{ext}": _decode(b, n)), label, name

    def _label(self, raw: RawSample, where: str) -> int:
        n = len(self.classes)
        value: object = None
        if "cls" in raw.members:
            src = f"{raw.key}.cls"
            text = raw.members["cls"].decode("utf-8", "replace").strip()
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else text
        elif "json" in raw.members:
            src = f"{raw.key}.json 'label'"
            try:
                meta = json.loads(raw.members["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise DataError(f"{where}: {raw.key}.json is not valid JSON ({e})") from None
            value = meta.get("label") if isinstance(meta, dict) else None
        if value is None:
            raise DataError(f"{where}: no label (expected a KEY.cls member holding the class index, "
                            f"or \"label\" in KEY.json)")
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < n:
                return value
            raise DataError(f"{where}: label {value} ({src}) is not a class index of {self.classes.path} "
                            f"(its {n} classes are 0..{n - 1})")
        if isinstance(value, str):
            if value in self._key_index:
                return self._key_index[value]
            hint = "" if self.classes.keys else " (string labels need FOLDER<TAB>class name lines; integer labels " \
                                                "index the lines)"
            raise DataError(f"{where}: label {value!r} ({src}) is not a FOLDER of {self.classes.path}{hint}")
        raise DataError(f"{where}: label {value!r} ({src}) must be an integer class index or a FOLDER name")


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _failing(problem: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        raise ImageError(problem)

    return load


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        return to_rgb(decode_image(data))
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None
    except Exception as e:  # mode conversion of an odd image, as samples.decode_sample
        raise ImageError(f"{name}: {type(e).__name__}: {e}") from None


def _batch(images: list[torch.Tensor], labels: list[int]) -> dict:
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64)}


def open_labeled(data: str | os.PathLike, classes: ClassList) -> LabeledImages:
    """An image folder or a shard spec (see the module docstring), checked against `classes`
    before any image is read. Raises DataError naming the folder, file or line."""
    data = str(data)
    local = not is_remote(data) and not any(c in data for c in "{}") and "::" not in data
    if local and not Path(data).exists():
        raise DataError(f"{data}: no such image folder or shard file")
    if local and _is_image_folder(data):
        return LabeledImages(data, classes, files=_scan_folder(Path(data), classes))
    source = ShardSource.from_spec(data)
    return LabeledImages(data, classes, source=source)


def _scan_folder(root: Path, classes: ClassList) -> list[tuple[Path, int]]:
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise DataError(f"{root / loose[0]}: an image directly in the image folder; it needs one sub-folder of "
                        f"images per class (torchvision ImageFolder layout)")
    folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        raise DataError(f"{root}: no class sub-folders (an image folder holds one sub-folder of images per class) "
                        f"and no shards")
    if classes.keys is None:
        if len(folders) != len(classes):
            raise DataError(
                f"{root}: {len(folders)} class sub-folders, but {classes.path} lists {len(classes)} class names. "
                f"In the one-name-per-line form line i names the i-th sub-folder in sorted order; write "
                f"FOLDER<TAB>class name lines to name them explicitly")
        label_of = {f: i for i, f in enumerate(folders)}
    else:
        index = {k: i for i, k in enumerate(classes.keys)}
        unknown = [f for f in folders if f not in index]
        if unknown:
            more = f"; {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise DataError(f"{root / unknown[0]}: class folder not in {classes.path} (add a line "
                            f"'{unknown[0]}<TAB>class name'){more}")
        present = set(folders)
        missing = [i for i, k in enumerate(classes.keys) if k not in present]
        if missing:
            i = missing[0]
            raise DataError(f"{classes.where(i)}: class folder {classes.keys[i]!r} is not in {root}; every listed "
                            f"class needs a sub-folder of images (remove the line to leave the class out)")
        label_of = index
    files: list[tuple[Path, int]] = []
    for folder in sorted(folders, key=lambda f: label_of[f]):
        images = sorted((p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                        key=lambda p: p.relative_to(root).as_posix())
        if not images:
            raise DataError(f"{root / folder}: no image files ({' '.join(IMAGE_SUFFIXES)})")
        files.extend((p, label_of[folder]) for p in images)
    return files
