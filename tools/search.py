"""Build a FAISS index of a corpus with an exported encoder, and query it.

    python tools/search.py index --export EXPORT --data SHARDS|FOLDER|CSV --out INDEX_DIR
        [--captions] [--index flat|ivf|hnsw] [--nlist N] [--hnsw-m M] [--batch-size B]
        [--max-samples N] [--overwrite] [--no-progress]
    python tools/search.py query --index INDEX_DIR [--export EXPORT] --text "a red circle" [-k 5]
    python tools/search.py query --index INDEX_DIR [--export EXPORT] --image photo.jpg [-k 5]

`index` embeds every image (and with --captions every caption) of the corpus; `flat` is
exact inner-product search, `ivf` (IVF-Flat, k-means cells trained on the corpus) and
`hnsw` are approximate, for large corpora. `query --text` ranks the images, `query
--image` ranks the captions (needs an index built with --captions). --export defaults
to the export that built the index; another model's export is refused. Exit status 0 on
success, 2 on an error.
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
from moco_mm.shards import ImageError


def cmd_index(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    encoder = search.Encoder.from_export(args.export)
    params = search.IndexParams(index_type=args.index, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                ef_search=args.ef_search)
    report = search.build_index(encoder, args.data, args.out, params=params, captions=args.captions,
                                batch_size=args.batch_size, max_samples=args.max_samples,
                                progress=not args.no_progress, overwrite=args.overwrite)
    info = report.info
    for kind, part in info["parts"].items():
        print(f"{kind}: {part['count']} vectors, {part['index_type']} index")
    if info["skipped"]:
        first = info["skipped"][0]
        print(f"skipped {len(info['skipped'])} unreadable input(s), e.g. {first['source']}: {first['reason']}")
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
    print(f"wrote {report.out} in {time.perf_counter() - t0:.1f}s ({timing})")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    kind = "images" if args.text is not None else "captions"
    index = search.SearchIndex.load(args.index, kind, nprobe=args.nprobe, ef_search=args.ef_search)
    export = args.export or index.info.get("export")
    if not export:
        raise search.SearchError(f"{args.index}: the index does not record its export; pass --export")
    encoder = search.Encoder.from_export(export)
    index.check_encoder(encoder)
    t0 = time.perf_counter()
    query = encoder.encode_texts([args.text]) if args.text is not None else encoder.encode_images([args.image])
    t1 = time.perf_counter()
    hits = index.search(query, args.k)[0]
    t2 = time.perf_counter()
    if args.json:
        print(json.dumps([{"rank": h.rank, "score": h.score, **h.meta} for h in hits], ensure_ascii=False))
    else:
        for h in hits:
            text = h.meta.get("caption") if kind == "captions" else "; ".join(h.meta.get("captions", [])[:1])
            print(f"{h.rank:3d}  {h.score:7.4f}  id={h.meta['id']}  {h.meta['source']}  {text or ''}")
    print(f"embedded the query in {1e3 * (t1 - t0):.1f} ms, searched {len(index)} {kind} in "
          f"{1e3 * (t2 - t1):.2f} ms", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="embed a corpus into an index directory")
    ix.add_argument("--export", required=True, help="export directory (tools/export.py)")
    ix.add_argument("--data", required=True, help="shard spec, image folder, or CSV/TSV/JSONL (image, caption)")
    ix.add_argument("--out", required=True, help="index directory to write")
    ix.add_argument("--captions", action="store_true", help="also index the captions (for query --image)")
    ix.add_argument("--index", choices=search.INDEX_TYPES, default="flat", help="flat (exact), ivf or hnsw")
    ix.add_argument("--nlist", type=int, default=0, help="ivf: cells; 0: about 4*sqrt(N)")
    ix.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument("--max-samples", type=int, default=None, help="index only the first N images")
    ix.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = sub.add_parser("query", help="search an index with a text or an image")
    q.add_argument("--index", required=True, help="index directory")
    q.add_argument("--export", default=None, help="export directory (default: the one that built the index)")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="rank the indexed images for this text")
    what.add_argument("--image", help="rank the indexed captions for this image file")
    q.add_argument("-k", type=int, default=5, help="hits to print")
    q.add_argument("--json", action="store_true", help="print the hits as one JSON list")
    for p in (ix, q):
        p.add_argument("--nprobe", type=int, default=None if p is q else 8, help="ivf: cells searched per query")
        p.add_argument("--ef-search", type=int, default=None if p is q else 64, help="hnsw: search breadth")
    args = ap.parse_args(argv)
    try:
        return cmd_index(args) if args.command == "index" else cmd_query(args)
    except (search.SearchError, ExportError, DataError, ImageError, ValueError) as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
