"""The data programs: `moco-mm make-shards` and `moco-mm demo-data` (argument parsing and
printing only; the work is in make_shards.py and demo.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moco_mm.data import demo, karpathy
from moco_mm.data import make_shards as shards

MAKE_SHARDS_USAGE = """Write webdataset shards from a CSV/TSV, a JSONL file or a folder of images + .txt captions.

    moco-mm make-shards INPUT --out DIR [--samples-per-shard 1000] [--max-shard-bytes 1G]
        [--max-size 512] [--workers 8] [--id-offset 0] [--overwrite] [--no-progress]

Rows naming the same image file become one sample holding all their captions (the first
row's sample_id, the first group given); the manifest counts them as `merged_rows`. An
optional `group` column (CSV/TSV) or field (JSONL: a string or an integer) names pairs that
must never be each other's negatives, e.g. the search query behind a click. Every sample's
KEY.json records `image_fp`, the fingerprint of its stored pixels, and its `group`. Bad rows are skipped and listed
in DIR/manifest.json (`skipped_rows`); the exit status is 0 unless the input as a whole is
unusable (2).

    moco-mm make-shards dataset_coco.json --format coco-karpathy --images COCO_DIR --out coco/
    moco-mm make-shards dataset_flickr30k.json --format flickr30k-karpathy --images flickr30k-images --out f30k/

The Karpathy split files (COCO: images at COCO_DIR/<filepath>/<filename>, e.g. val2014/...;
Flickr30k: at IMAGES/<filename>) become OUT/train (restval folded in), OUT/val and OUT/test
(--splits picks some), one sample per image with its first 5 `raw` sentences; missing
images are skipped and listed. The test manifest records the evaluation protocol
(coco-5k-1k / flickr-1k) that `moco-mm eval-retrieval` then reports."""


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1000', '500M', '1G', '2.5g' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    number = t[: len(t) - len(unit)]
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1000000, 500M, 1G)") from None


def make_shards_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm make-shards", description=MAKE_SHARDS_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="CSV/TSV (columns image, caption[, group]), JSONL (image, caption[, group]) "
                                          "or a folder; with --format *-karpathy the split JSON")
    ap.add_argument("--format", choices=("pairs", *karpathy.FORMATS), default="pairs",
                    help="pairs (default): CSV/TSV/JSONL/folder; coco-karpathy / flickr30k-karpathy: "
                         "dataset_coco.json / dataset_flickr30k.json -> OUT/train, OUT/val, OUT/test")
    ap.add_argument("--images", default=None, help="Karpathy formats: the image folder (default: the JSON's folder)")
    ap.add_argument("--splits", default=",".join(karpathy.SPLITS),
                    help="Karpathy formats: comma-separated splits to write (default train,val,test)")
    ap.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and manifest.json "
                                                 "(Karpathy formats: one sub-folder per split)")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="0: no count limit")
    ap.add_argument("--max-shard-bytes", type=parse_bytes, default=0, help="e.g. 1G; 0: no size limit")
    ap.add_argument("--max-size", type=int, default=0, help="shrink the long side to this many pixels; 0: keep")
    ap.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="encoder processes; 0: encode in this process")
    ap.add_argument("--id-offset", type=int, default=0, help="sample_id of the first row (disjoint splits)")
    ap.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.format != "pairs":
        return _karpathy_main(args)
    if args.images is not None:
        ap.error("--images is for --format coco-karpathy / flickr30k-karpathy")
    try:
        manifest = shards.make_shards(
            args.input, args.out,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
            max_size=args.max_size, jpeg_quality=args.jpeg_quality, workers=args.workers,
            id_offset=args.id_offset, progress=not args.no_progress, overwrite=args.overwrite,
        )
    except (shards.InputError, FileExistsError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    merged = ""
    if manifest["merged_rows"]:
        merged = f"; merged {manifest['merged_rows']} rows into the sample of an earlier row naming the same image"
    print(f"make_shards: wrote {manifest['samples']} samples in {len(manifest['shards'])} shards to "
          f"{args.out}{merged}; skipped {manifest['skipped']} (reasons in {Path(args.out) / shards.MANIFEST})")
    return 0


def _karpathy_main(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        manifests = karpathy.make_karpathy_shards(
            args.input, args.out, args.format, images=args.images, splits=splits,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
            max_size=args.max_size, jpeg_quality=args.jpeg_quality, workers=args.workers,
            id_offset=args.id_offset, progress=not args.no_progress, overwrite=args.overwrite,
        )
    except (shards.InputError, FileExistsError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    for split, m in manifests.items():
        k = m["karpathy"]
        print(f"make_shards: {split} ({'+'.join(k['json_splits'])}): wrote {m['samples']} images, "
              f"{k['captions_listed']} captions listed, in {len(m['shards'])} shards to {Path(args.out) / split}; "
              f"skipped {m['skipped']} of {k['images_listed']} (reasons in its {shards.MANIFEST}); "
              f"eval protocol {m['eval_protocol']}")
    return 0


def demo_data_main(argv: list[str] | None = None) -> int:
    d = demo.DemoParams()
    ap = argparse.ArgumentParser(prog="moco-mm demo-data",
                                 description="Build the procedural demo dataset and tokenizer.")
    ap.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--train", type=int, default=d.n_train, help="train pairs")
    ap.add_argument("--val", type=int, default=d.n_val, help="held-out pairs")
    ap.add_argument("--image-size", type=int, default=d.image_size)
    ap.add_argument("--train-shards", type=int, default=d.train_shards)
    ap.add_argument("--val-shards", type=int, default=d.val_shards)
    ap.add_argument("--captions-per-image", type=int, default=d.captions_per_image, choices=(1, 2))
    ap.add_argument("--workers", type=int, default=0, help="make_shards encoder processes")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = ap.parse_args(argv)
    params = demo.DemoParams(seed=args.seed, n_train=args.train, n_val=args.val, image_size=args.image_size,
                        train_shards=args.train_shards, val_shards=args.val_shards,
                        captions_per_image=args.captions_per_image)
    paths = demo.build_demo(args.out, params, force=args.force, workers=args.workers, progress=True)
    verb = "built" if paths.built else "already complete, kept"
    print(f"demo_data: {verb}: train={paths.train} val={paths.val} tokenizer={paths.tokenizer}")
    return 0


MAKE_MANIFEST_USAGE = """Write the manifest.json the loader reads (shard URLs + samples per shard) for shards
written by others, e.g. img2dataset.

    moco-mm make-manifest laion/ --out laion/manifest.json                # img2dataset stats
    moco-mm make-manifest 'shards/part-{000000..000999}.tar' --out shards/ --count --workers 16
    moco-mm make-manifest 'pipe:aws s3 cp s3://bucket/laion/{00000..00099}.tar -' --out laion.json --count
    moco-mm make-manifest laion/ --out laion.json --url-template 'pipe:aws s3 cp s3://bucket/laion/{name} -'

From img2dataset output folders (NNNNN.tar + NNNNN_stats.json) the counts are the stats'
`successes` and no tar is read (--check-ids reads them too); otherwise (or with --count)
every shard is read, --workers at a time. Duplicate sample ids across shards are an error
naming both shards and the id. Exit status 2 with a message naming the file on bad input."""


def make_manifest_main(argv: list[str] | None = None) -> int:
    from moco_mm.data.manifest import make_manifest
    from moco_mm.data.sources import DataError

    ap = argparse.ArgumentParser(prog="moco-mm make-manifest", description=MAKE_MANIFEST_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="img2dataset output folders, shard folders, tar paths, brace "
                                              "patterns or pipe: URLs")
    ap.add_argument("--out", required=True, help="the manifest to write (a .json path, or a folder: its manifest.json)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--stats", action="store_const", dest="mode", const="stats",
                     help="counts from img2dataset's NNNNN_stats.json (default for folders that hold them)")
    how.add_argument("--count", action="store_const", dest="mode", const="count",
                     help="count by reading every shard")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="shards read at a time")
    ap.add_argument("--url-template", default=None,
                    help="store shards as this URL, {name} = the file name, e.g. 'pipe:aws s3 cp s3://b/{name} -'")
    ap.add_argument("--check-ids", action="store_true", help="with stats: also read the shards (ids, counts)")
    ap.add_argument("--retries", type=int, default=3, help="tries of a failing pipe: shard beyond the first")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.retries < 0:
        ap.error("--workers must be >= 1 and --retries >= 0")
    try:
        m = make_manifest(args.inputs, args.out, mode=args.mode or "auto", workers=args.workers,
                          progress=not args.no_progress and sys.stderr.isatty(), url_template=args.url_template,
                          check_ids=args.check_ids, retries=args.retries, overwrite=args.overwrite)
    except DataError as e:
        print(f"moco-mm make-manifest: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out.endswith(".json") else Path(args.out) / "manifest.json"
    print(f"{out}: {len(m['shards'])} shards, {m['samples']} samples (counted by {m['counted_by']})")
    return 0
