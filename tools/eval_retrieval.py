"""Image<->text retrieval metrics of an exported encoder on held-out shards.

    python tools/eval_retrieval.py --export EXPORT --data SHARDS [--json OUT] [--max-samples N]
        [--batch-size 64] [--no-progress]

Prints R@1/5/10 (percent) and the median rank for image->text and text->image with every
caption of every image (Flickr30k/COCO protocol: an image query hits at k when any of its
captions is in its top k; each caption query has its one image). --json writes the same
numbers plus n_images, n_captions, the chance R@1 of each direction, the export and the
data. Exit status 0 on success, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    from moco_mm import search
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moco_mm import search
from moco_mm.data import DataError
from moco_mm.export import ExportError
from moco_mm.metrics import format_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (tools/export.py)")
    ap.add_argument("--data", required=True, help="shard spec: manifest.json, shard folder or brace pattern")
    ap.add_argument("--json", default=None, help="write the metrics here as JSON")
    ap.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        encoder = search.Encoder.from_export(args.export)
        m = search.evaluate_retrieval(encoder, args.data, max_samples=args.max_samples, batch_size=args.batch_size,
                                      progress=not args.no_progress)
    except (search.SearchError, ExportError, DataError, ValueError) as e:
        print(f"eval_retrieval: error: {e}", file=sys.stderr)
        return 2
    n_img, n_txt = int(m["n_images"]), int(m["n_captions"])
    print(f"{n_img} images, {n_txt} captions ({time.perf_counter() - t0:.1f}s)")
    print(format_table(m))
    if args.json:
        # Chance R@1 is 1/n_img both ways: a random ranking puts a caption's image first
        # with 1/n_img, and one of an image's c captions first with c/n_txt = 1/n_img on average.
        out = {**m, "chance_i2t_R@1": 100.0 / n_img, "chance_t2i_R@1": 100.0 / n_img,
               "export": str(Path(args.export).resolve()), "model_fingerprint": encoder.fingerprint,
               "data": args.data}
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
