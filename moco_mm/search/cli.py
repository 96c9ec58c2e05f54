"""The search programs: `moco-mm export`, `moco-mm search`, `moco-mm eval-retrieval`.

Argument parsing and printing only; the work is in export.py, encoder.py, index.py and
evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moco_mm import search as S
from moco_mm.data import DataError
from moco_mm.data.make_shards import ImageError
from moco_mm.metrics import format_table
from moco_mm.search import export as ex
from moco_mm.search.clip_export import FORMATS, export_clip
from moco_mm.search.evaluate import FOLD_SIZE, PROTOCOLS, evaluate_protocol
from moco_mm.search.export import ExportError
from moco_mm.search.index import INDEX_TYPES

EXPORT_USAGE = """Export a run's towers for search: safetensors + JSON (+ verified ONNX), no training code needed.

    moco-mm export --run RUN_DIR --out EXPORT_DIR [--towers query|key] [--onnx]
    moco-mm export --checkpoint RUN_DIR/checkpoints/step_NNNNNNNN --out EXPORT_DIR
    moco-mm export --run RUN_DIR --out OUT --format open_clip|hf     # hand back a CLIP

--run takes the run's newest complete checkpoint. --onnx adds image_encoder.onnx and
text_encoder.onnx, each checked against PyTorch with onnxruntime (max abs difference
<= --atol, float32); a mismatch fails the export and leaves nothing behind. The layout
is documented in `moco_mm.search.export`. Exit status 0 on success, 2 on an error."""

SEARCH_USAGE = """Build a FAISS index of a corpus with an exported encoder, and query it.

    moco-mm search index --export EXPORT --data SHARDS|FOLDER|CSV --out INDEX_DIR
        [--captions] [--index flat|ivf|hnsw] [--nlist N] [--hnsw-m M] [--batch-size B]
        [--max-samples N] [--overwrite] [--no-progress]
    moco-mm search build-index --emb EMB_DIR --out INDEX_DIR [--max-ram 2GB] [--index auto|flat|ivfpq|hnsw]
        [--recall-queries 1000] [--overwrite]
    moco-mm search query --index INDEX_DIR [--export EXPORT] --text "a red circle" [-k 5]
    moco-mm search query --index INDEX_DIR [--export EXPORT] --image photo.jpg [-k 5]

`index` embeds every image (and with --captions every caption) of the corpus; `flat` is
exact inner-product search, `ivf` (IVF-Flat, k-means cells trained on the corpus) and
`hnsw` are approximate, for large corpora. `query --text` ranks the images, `query
--image` ranks the captions (needs an index built with --captions). --export defaults
to the export that built the index; another model's export is refused.

`build-index` turns the parts of `moco-mm embed` (any number of ranks) into the same
index directory without holding every vector in memory: it picks flat (exact), HNSW or
IVF-PQ from the corpus size and --max-ram (rules in `moco_mm.search.streaming` and the
README; stored in index.json), trains on a sample read part by part, adds part by part,
and reports recall@10 against exact search for image->image and text->image queries.
Exit status 0 on success, 2 on an error."""

EVAL_USAGE = """Image<->text retrieval metrics of an exported encoder on held-out shards.

    moco-mm eval-retrieval --export EXPORT --data SHARDS [--protocol auto|plain|coco-5k-1k|flickr-1k]
        [--json OUT] [--max-samples N] [--batch-size 64] [--no-progress]
    moco-mm eval-retrieval --export EXPORT --data coco/test/manifest.json    # COCO 5k and 1k tables

Prints R@1/5/10 (percent), the median rank and rsum (the six recalls summed, what papers
report) for image->text and text->image with every caption of every image (Flickr30k/COCO
protocol: an image query hits at k when any of its captions is in its top k; each caption
query has its one image). --protocol picks the tables: plain, every image of --data;
coco-5k-1k, Karpathy's COCO test split: all 5,000 images / 25,000 captions ("5k") AND the
mean over its five folds of 1,000 consecutive images ("1k"); flickr-1k, Karpathy's
Flickr30k test split (1,000 images / 5,000 captions); auto (default), the protocol that
`make-shards --format coco-karpathy|flickr30k-karpathy` wrote into the manifest (test
split), else plain (always plain with --max-samples). A set of another size is evaluated
with a warning. --json writes the whole set's numbers at the top level plus n_images,
n_captions, the chance R@1 of each direction, the protocol, every table (`tables`), the
1k folds (`folds`), warnings, the export and the data. Exit status 0 on success, 2 on an
error."""


def export_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm export", description=EXPORT_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    src.add_argument("--checkpoint", help="a checkpoint step directory inside a run directory")
    ap.add_argument("--out", required=True, help="export directory to write")
    ap.add_argument("--towers", choices=ex.TOWERS, default="query",
                    help="query: the trained towers (default); key: their momentum copies")
    ap.add_argument("--format", choices=("moco_mm", *FORMATS), default="moco_mm",
                    help="moco_mm: our bundle (Encoder.from_export, search, ONNX); open_clip: a directory "
                         "open_clip.create_model_and_transforms('local-dir:OUT') loads; hf: a CLIPModel / "
                         "VisionTextDualEncoderModel directory for transformers (the last two: runs that "
                         "started from a CLIP, model.init_from)")
    ap.add_argument("--onnx", action="store_true", help="also write verified ONNX graphs (--format moco_mm)")
    ap.add_argument("--atol", type=float, default=ex.ONNX_ATOL, help="ONNX vs PyTorch tolerance")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.onnx and args.format != "moco_mm":
        ap.error("--onnx goes with --format moco_mm")
    try:
        if args.format != "moco_mm":
            res = export_clip(args.out, args.format, run_dir=args.run, checkpoint=args.checkpoint,
                              towers=args.towers, overwrite=args.overwrite, log=lambda s: print(s, file=sys.stderr))
            print(f"exported {res.towers} towers of step {res.step} to {res.out} as {res.format} in "
                  f"{time.perf_counter() - t0:.1f}s (reloaded with its library: max |diff| {res.max_abs_diff:.3g})")
            return 0
        res = ex.export_encoders(args.out, run_dir=args.run, checkpoint=args.checkpoint, towers=args.towers,
                                 onnx=args.onnx, overwrite=args.overwrite, atol=args.atol,
                                 log=lambda s: print(s, file=sys.stderr))
    except (ex.ExportError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {res.towers} towers of step {res.step} to {res.out} in {time.perf_counter() - t0:.1f}s")
    for name, check in res.onnx.items():
        print(f"  {name}: max |onnx - torch| = {check.max_abs_diff:.3g} (allowed {check.atol:g})")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    encoder = S.Encoder.from_export(args.export)
    params = S.IndexParams(index_type=args.index, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                ef_search=args.ef_search)
    report = S.build_index(encoder, args.data, args.out, params=params, captions=args.captions,
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


def cmd_build_index(args: argparse.Namespace) -> int:
    from moco_mm.search.streaming import build_index_from_parts

    t0 = time.perf_counter()
    report = build_index_from_parts(args.emb, args.out, max_ram=args.max_ram, index=args.index,
                                    recall_queries=args.recall_queries, overwrite=args.overwrite,
                                    say=lambda s: print(f"build-index: {s}", file=sys.stderr, flush=True))
    info = report.info
    for kind, part in info["parts"].items():
        print(f"{kind}: {part['count']} vectors, {part['index_type']} index ({part['faiss_bytes']} bytes)")
    r = info["recall"]
    print(f"recall@{r['k']} vs exact search: " + ", ".join(
        f"{name} {r[name]:.3f}" for name in ("image->image", "text->image", "image->caption") if name in r)
        + f" ({r['image_queries']} held-out image queries, {r['text_queries']} caption queries)")
    if info["skipped"]:
        first = info["skipped"][0]
        print(f"{len(info['skipped'])} samples were skipped while embedding, e.g. {first['source']}: {first['reason']}")
    print(f"wrote {report.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    kind = "images" if args.text is not None else "captions"
    index = S.SearchIndex.load(args.index, kind, nprobe=args.nprobe, ef_search=args.ef_search)
    export = args.export or index.info.get("export")
    if not export:
        raise S.SearchError(f"{args.index}: the index does not record its export; pass --export")
    encoder = S.Encoder.from_export(export)
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


def search_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm search", description=SEARCH_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    ix = sub.add_parser("index", help="embed a corpus into an index directory")
    ix.add_argument("--export", required=True, help="export directory (moco-mm export)")
    ix.add_argument("--data", required=True, help="shard spec, image folder, or CSV/TSV/JSONL (image, caption)")
    ix.add_argument("--out", required=True, help="index directory to write")
    ix.add_argument("--captions", action="store_true", help="also index the captions (for query --image)")
    ix.add_argument("--index", choices=INDEX_TYPES, default="flat", help="flat (exact), ivf or hnsw")
    ix.add_argument("--nlist", type=int, default=0, help="ivf: cells; 0: about 4*sqrt(N)")
    ix.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node")
    ix.add_argument("--batch-size", type=int, default=64)
    ix.add_argument("--max-samples", type=int, default=None, help="index only the first N images")
    ix.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")

    from moco_mm.search import streaming

    bi = sub.add_parser("build-index", help="index the parts of `moco-mm embed` within a memory budget",
                        description=streaming.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bi.add_argument("--emb", required=True, help="embedding directory (moco-mm embed --out)")
    bi.add_argument("--out", required=True, help="index directory to write")
    bi.add_argument("--max-ram", default="2GB", help="memory budget: 2GB, 512MB, 64KB (powers of 1024) or bytes")
    bi.add_argument("--index", choices=("auto", "flat", "ivfpq", "hnsw"), default="auto",
                    help="auto (default): flat, HNSW or IVF-PQ by corpus size and --max-ram")
    bi.add_argument("--recall-queries", type=int, default=1000,
                    help="queries per kind for the recall@10 report (image queries: at most N/10)")
    bi.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

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
        return {"index": cmd_index, "build-index": cmd_build_index, "query": cmd_query}[args.command](args)
    except (S.SearchError, ExportError, DataError, ImageError, ValueError) as e:
        print(f"search: error: {e}", file=sys.stderr)
        return 2


def eval_retrieval_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm eval-retrieval", description=EVAL_USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="export directory (moco-mm export)")
    ap.add_argument("--data", required=True, help="shard spec: manifest.json, shard folder or brace pattern")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                    help="tables to report: auto (default: the manifest's eval_protocol, else plain), plain, "
                         "coco-5k-1k (COCO 5k test + mean of five 1k folds), flickr-1k")
    ap.add_argument("--fold-size", type=int, default=FOLD_SIZE, help=argparse.SUPPRESS)  # tests only
    ap.add_argument("--json", default=None, help="write the metrics here as JSON")
    ap.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        encoder = S.Encoder.from_export(args.export)
        report = evaluate_protocol(encoder, args.data, args.protocol, fold_size=args.fold_size,
                                   max_samples=args.max_samples, batch_size=args.batch_size,
                                   progress=not args.no_progress)
    except (S.SearchError, ExportError, DataError, ValueError) as e:
        print(f"eval_retrieval: error: {e}", file=sys.stderr)
        return 2
    m = report.whole
    n_img, n_txt = int(m["n_images"]), int(m["n_captions"])
    print(f"{n_img} images, {n_txt} captions, protocol {report.protocol} ({time.perf_counter() - t0:.1f}s)")
    for name, table in report.tables.items():
        if "n_folds" in table:
            title = f"{name}: mean over {int(table['n_folds'])} folds of {int(table['fold_size'])} images"
        else:
            title = f"{name}: {int(table['n_images'])} images, {int(table['n_captions'])} captions"
        print(f"\n{title}\n{format_table(table)}\nrsum {table['rsum']:.2f}")
    for warning in report.warnings:
        print(f"eval_retrieval: warning: {warning}", file=sys.stderr)
    if args.json:
        # Chance R@1 is 1/n_img both ways: a random ranking puts a caption's image first
        # with 1/n_img, and one of an image's c captions first with c/n_txt = 1/n_img on average.
        out = {**m, "chance_i2t_R@1": 100.0 / n_img, "chance_t2i_R@1": 100.0 / n_img,
               "export": str(Path(args.export).resolve()), "model_fingerprint": encoder.fingerprint,
               "data": args.data, "protocol": report.protocol, "tables": report.tables, "folds": report.folds,
               "warnings": report.warnings}
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0
