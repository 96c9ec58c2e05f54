"""The Karpathy splits of COCO and Flickr30k -> shards, one folder per split (`moco-mm make-shards
--format coco-karpathy | flickr30k-karpathy`).

Input: the split file of Karpathy & Fei-Fei (2015), `dataset_coco.json` or
`dataset_flickr30k.json`, and the folder of the images it names:

    {"dataset": "coco" | "flickr30k",
     "images": [{"filepath": "val2014",            # COCO only: the image's sub-folder
                 "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": "A man riding a bike.", "tokens": [...], ...}, ...],
                 "imgid": 0, "cocoid" | "sentids" | ...: ...}, ...]}

The image is IMAGES/filepath/filename (COCO: IMAGES holds train2014/ and val2014/) or
IMAGES/filename (Flickr30k: IMAGES is the flickr30k-images folder); IMAGES defaults to the
JSON's folder.

Output: OUT/train, OUT/val, OUT/test, each written by make_shards.write_shards (the same
shards and manifest as every other input), ONE sample per image holding its captions:
  * `restval` (COCO's 30,504 extra validation images) is folded into train, as is usual
    (113,287 COCO training images; Flickr30k has no restval);
  * captions are the `raw` sentences, stripped, empty and exact duplicates dropped, the
    first MAX_CAPTIONS (5) kept (a few COCO images have 6 or 7; the standard test sets are
    5,000 images / 25,000 captions and 1,000 / 5,000);
  * sample_id = id_offset + the image's position in the JSON's `images` list, so ids are
    unique across the three splits (Karpathy's `imgid` is that position too);
  * a missing or bad image file is skipped and recorded like any bad row (`skipped_rows`);
  * each manifest also holds `karpathy` (dataset, split, the JSON splits it holds, caption
    counts) and `eval_protocol`: `coco-5k-1k` / `flickr-1k` for the test split, `plain`
    for train and val. `moco-mm eval-retrieval --protocol auto` (its default) reads it.

A JSON that is not in this format stops with InputError naming the file and what is
missing; nothing is written then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from moco_mm.data.make_shards import MANIFEST, InputError, Row, _clear_outputs, write_shards

# --format value -> the JSON's "dataset" value.
FORMATS = {"coco-karpathy": "coco", "flickr30k-karpathy": "flickr30k"}
SPLITS = ("train", "val", "test")
# JSON split -> output split.
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_CAPTIONS = 5

# Evaluation protocols (moco_mm.search.evaluate): name -> the image count of the standard set
# (None: any). coco-5k-1k: the 5k test set AND the mean over its five folds of 1,000
# consecutive images; flickr-1k: the 1k test set; plain: whatever the shards hold.
EVAL_PROTOCOLS: dict[str, int | None] = {"plain": None, "coco-5k-1k": 5000, "flickr-1k": 1000}
TEST_PROTOCOL = {"coco": "coco-5k-1k", "flickr30k": "flickr-1k"}


def read_karpathy(path: str | Path, fmt: str, images: str | Path | None = None) -> dict[str, tuple[list[Row], dict]]:
    """Parse the split file -> {output split: (rows, stats)} for the splits it holds.

    One Row per image (captions inline, at most MAX_CAPTIONS); `stats` counts, as listed in
    the JSON (before any image is opened), the images of each JSON split folded in
    (`json_splits`), images, captions kept and captions dropped beyond MAX_CAPTIONS.
    Raises InputError (naming `path`) when the file is not a Karpathy split file of `fmt`.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    dataset = FORMATS[fmt]
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file (the Karpathy split file, e.g. dataset_{dataset}.json)")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{p}: not a JSON file ({e}); --format {fmt} reads dataset_{dataset}.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{p}: not a Karpathy split file: missing the top-level 'images' list "
                         f"(expected {{\"images\": [...], \"dataset\": \"{dataset}\"}})")
    found = data.get("dataset")
    if found is not None and found != dataset:
        raise InputError(f"{p}: 'dataset' is {found!r} but --format {fmt} expects {dataset!r}"
                         + (f" (use --format {k})" if (k := _format_of(found)) else ""))
    root = str(Path(images) if images is not None else p.parent)
    if not Path(root).is_dir():
        raise InputError(f"--images {root}: no such folder (the images of {p})")
    out: dict[str, tuple[list[Row], dict]] = {}
    for index, entry in enumerate(data["images"]):
        split, rel, captions, dropped = _parse_entry(p, index, entry, dataset)
        fresh = {"json_splits": {}, "images_listed": 0, "captions_listed": 0, "captions_dropped": 0}
        rows, stats = out.setdefault(SPLIT_OF[split], ([], fresh))
        rows.append(Row(index, rel, root, captions=captions))
        stats["json_splits"][split] = stats["json_splits"].get(split, 0) + 1
        stats["images_listed"] += 1
        stats["captions_listed"] += len(captions)
        stats["captions_dropped"] += dropped
    if not out:
        raise InputError(f"{p}: the 'images' list is empty")
    return {s: out[s] for s in SPLITS if s in out}


def _format_of(dataset: object) -> str | None:
    return next((k for k, v in FORMATS.items() if v == dataset), None)


def _parse_entry(p: Path, index: int, entry: object, dataset: str) -> tuple[str, str, tuple[str, ...], int]:
    """-> (JSON split, image path relative to the image folder, captions, captions dropped)."""
    where = f"{p}: images[{index}]"
    if not isinstance(entry, dict):
        raise InputError(f"{where} is a {type(entry).__name__}, not an object with 'filename', 'split', 'sentences'")
    need = ("filepath", "filename", "split", "sentences") if dataset == "coco" else ("filename", "split", "sentences")
    missing = [k for k in need if k not in entry]
    if missing:
        hint = " (COCO entries name their sub-folder, e.g. 'val2014', in 'filepath')" if "filepath" in missing else ""
        raise InputError(f"{where} has no {', '.join(repr(k) for k in missing)}{hint}")
    for key in need[:-1]:
        if not isinstance(entry[key], str) or not entry[key]:
            raise InputError(f"{where}: {key!r} must be a non-empty string, got {json.dumps(entry[key])[:40]}")
    if entry["split"] not in SPLIT_OF:
        raise InputError(f"{where}: unknown split {entry['split']!r}; expected one of {', '.join(SPLIT_OF)}")
    sentences = entry["sentences"]
    if not isinstance(sentences, list):
        raise InputError(f"{where}: 'sentences' must be a list of objects with 'raw'")
    raws = []
    for j, sent in enumerate(sentences):
        if not isinstance(sent, dict) or not isinstance(sent.get("raw"), str):
            raise InputError(f"{where}.sentences[{j}] has no 'raw' string (the caption text)")
        raws.append(sent["raw"].strip())
    unique = tuple(dict.fromkeys(r for r in raws if r))  # empties and exact duplicates dropped
    rel = f"{entry['filepath']}/{entry['filename']}" if dataset == "coco" else entry["filename"]
    return entry["split"], rel, unique[:MAX_CAPTIONS], max(0, len(unique) - MAX_CAPTIONS)


def make_karpathy_shards(path: str | Path, out_dir: str | Path, fmt: str, *, images: str | Path | None = None,
                         splits: Sequence[str] = SPLITS, overwrite: bool = False, **options) -> dict[str, dict]:
    """Write OUT/<split>/ for each of `splits` the file holds -> {split: manifest}.

    `options` go to make_shards.write_shards (samples_per_shard, max_size, workers,
    id_offset, progress, ...). Every output folder is checked before anything is written.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"splits {list(splits)}: choose among {', '.join(SPLITS)}")
    parsed = read_karpathy(path, fmt, images)
    todo = [s for s in SPLITS if s in splits and s in parsed]
    if not todo:
        raise InputError(f"{path}: holds none of the splits {', '.join(splits)} "
                         f"(it holds {', '.join(parsed)})")
    out = Path(out_dir)
    if not overwrite:
        for split in todo:
            if (out / split).is_dir():
                _clear_outputs(out / split, overwrite=False)  # raises FileExistsError when not empty
    manifests = {}
    for split in todo:
        rows, stats = parsed[split]
        extra = {"karpathy": {"dataset": FORMATS[fmt], "split": split, "max_captions": MAX_CAPTIONS, **stats},
                 "eval_protocol": TEST_PROTOCOL[FORMATS[fmt]] if split == "test" else "plain"}
        manifests[split] = write_shards(rows, out / split, overwrite=overwrite, input_label=str(path),
                                        manifest_extra=extra, **options)
    return manifests


def read_eval_protocol(spec: str | Path) -> str | None:
    """The `eval_protocol` recorded in the manifest of a local shard spec (a manifest.json or
    a folder holding one); None for anything else (patterns, several parts, no such key)."""
    p = Path(str(spec))
    if "::" in str(spec):
        return None
    if p.is_dir():
        p = p / MANIFEST
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        value = json.loads(p.read_text(encoding="utf-8")).get("eval_protocol")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in EVAL_PROTOCOLS else None
