"""A search index from embedded parts (moco_mm.search.embed), streamed within a memory budget.

    report = build_index_from_parts("emb/demo", "index/demo", max_ram="2GB")   # index="auto"
    SearchIndex.load("index/demo", "images")           # the same moco_mm.index/1 directory

The index type follows from the corpus size N, the dimension D and the budget B
(`--max-ram`), per kind (images, then captions; each built, written and freed in turn):

    flat   exact inner product, N*D*4 bytes:           when that is <= 60 % of B and N <= 1,000,000
    hnsw   HNSW-Flat, M=32, about N*(4*D + 8*M)*1.1 B: when that is <= 60 % of B and N <= 5,000,000
    ivfpq  IVF-PQ, everything else: nlist = 4*sqrt(N) cells, at most one per 39 training
           vectors; PQ with the most bytes per vector m (a divisor of D in 64, 32, 16, 8, 4,
           2, 1) for which N*(m + 8) + nlist*D*4 <= 60 % of B; 8-bit codes (fewer bits only
           when the training sample has under 39*256 vectors); nprobe = min(nlist, 16).
           The quantizer trains on a uniform sample of min(N, 20 % of B as float32,
           max(39*256, 39*nlist)) vectors, read part by part; then every vector is added,
           part by part.

`--index flat|hnsw|ivfpq` forces a type (refused when its estimate exceeds 60 % of B).
Vectors are read memory-mapped, in chunks of at most 65,536 rows and 10 % of B: flat and
HNSW hold the vectors in the index itself (that is the estimate above); IVF-PQ holds only
codes.

At the end the recall@10 of the index against exact search is measured and stored in
index.json (`recall`): held-out image rows (not in the training sample; the query's own
row is left out of both lists) against the image index (image->image), caption vectors
against the image index (text->image: an index trained on images may serve text queries
worse), and image rows against the caption index (image->caption). A hit is a returned
row whose exact score reaches the exact 10th score (ties count); the exact top-10 is
computed by streaming the parts, never by loading them all.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moco_mm.search.embed import Embeddings
from moco_mm.search.encoder import SearchError
from moco_mm.search.index import INDEX_FORMAT, INDEX_INFO, IndexReport, _faiss
from moco_mm.search.thumbs import THUMBS_BIN, THUMBS_IDX

INDEX_CHOICES = ("auto", "flat", "ivfpq", "hnsw")
INDEX_SHARE = 0.6  # of --max-ram for the index itself; the rest: chunks, training sample, queries
TRAIN_SHARE = 0.2  # of --max-ram for the quantizer's training sample (float32)
FLAT_MAX_N = 1_000_000  # beyond this exact search costs tens of ms per query on a CPU
HNSW_MAX_N = 5_000_000  # beyond this HNSW's build time and memory favour IVF-PQ
HNSW_M = 32
PQ_M = (64, 32, 16, 8, 4, 2, 1)
MIN_PER_CELL = 39  # FAISS's k-means warns below 39 training points per centroid
NPROBE = 16
CHUNK_ROWS = 65536
RECALL_K = 10


def parse_size(text: str | int) -> int:
    """'2GB', '512MB', '64KB', '1.5G', '1000000' -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise SearchError(f"--max-ram {text!r}: give a size such as 2GB, 512MB or a number of bytes")
    value = float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " ")
    if value < 1:
        raise SearchError(f"--max-ram {text!r}: must be positive")
    return int(value)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class IndexPlan:
    index_type: str  # flat | hnsw | ivfpq
    n: int
    dim: int
    max_ram: int
    estimated_bytes: int
    rule: str  # why this type, in words
    params: dict = field(default_factory=dict)


def flat_bytes(n: int, d: int) -> int:
    return n * d * 4


def hnsw_bytes(n: int, d: int, m: int = HNSW_M) -> int:
    return int(n * (4 * d + 8 * m) * 1.1)


def ivfpq_bytes(n: int, d: int, nlist: int, m: int, nbits: int = 8) -> int:
    return n * (math.ceil(m * nbits / 8) + 8) + nlist * d * 4 + d * (2 ** nbits) * 4


def plan_index(n: int, dim: int, max_ram: int | str, index: str = "auto", n_available_for_training: int | None = None
               ) -> IndexPlan:
    """The index for N vectors of dimension D within `max_ram` bytes (the module's rules)."""
    if index not in INDEX_CHOICES:
        raise SearchError(f"--index {index!r}: choose one of {', '.join(INDEX_CHOICES)}")
    if n < 1:
        raise SearchError("nothing to index: the embedding directory holds no vectors")
    budget = parse_size(max_ram)
    room = int(INDEX_SHARE * budget)
    flat, hnsw = flat_bytes(n, dim), hnsw_bytes(n, dim)
    if index in ("auto", "flat") and (index == "flat" or (flat <= room and n <= FLAT_MAX_N)):
        if flat > room:
            raise SearchError(f"--index flat: {n} x {dim} float32 vectors need {_human(flat)}, over 60 % of "
                              f"--max-ram {_human(budget)}: raise --max-ram or use --index auto")
        rule = (f"flat: N*D*4 = {_human(flat)} <= 60 % of --max-ram and N <= {FLAT_MAX_N:,}" if index == "auto"
                else "flat: asked for (--index flat)")
        return IndexPlan("flat", n, dim, budget, flat, rule)
    if index in ("auto", "hnsw") and (index == "hnsw" or (hnsw <= room and n <= HNSW_MAX_N)):
        if hnsw > room:
            raise SearchError(f"--index hnsw: about {_human(hnsw)} for {n} vectors, over 60 % of --max-ram "
                              f"{_human(budget)}: raise --max-ram or use --index auto")
        why = ("flat's N*D*4 is over 60 % of --max-ram" if flat > room else f"N > {FLAT_MAX_N:,}")
        rule = (f"hnsw: {why}; HNSW's N*(4D+8M)*1.1 = {_human(hnsw)} fits and N <= {HNSW_MAX_N:,}"
                if index == "auto" else "hnsw: asked for (--index hnsw)")
        return IndexPlan("hnsw", n, dim, budget, hnsw, rule,
                         {"hnsw_m": HNSW_M, "ef_construction": 80, "ef_search": 64})
    # IVF-PQ: the training sample, the cells, the code size.
    avail = n if n_available_for_training is None else max(1, n_available_for_training)
    n_train = int(min(avail, max(1, TRAIN_SHARE * budget // (4 * dim))))
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n_train // MIN_PER_CELL))
    n_train = min(n_train, max(MIN_PER_CELL * 256, MIN_PER_CELL * nlist))  # more does not help k-means
    nbits = 8 if n_train >= MIN_PER_CELL * 256 else max(1, min(8, int(math.log2(max(2, n_train // MIN_PER_CELL)))))
    for m in PQ_M:
        if dim % m == 0 and m <= dim and ivfpq_bytes(n, dim, nlist, m, nbits) <= room:
            break
    else:
        need = ivfpq_bytes(n, dim, nlist, 1, nbits)
        raise SearchError(f"--max-ram {_human(budget)}: even IVF-PQ with 1 byte per vector needs about "
                          f"{_human(need)} for {n} vectors (60 % of the budget is for the index): raise --max-ram")
    est = ivfpq_bytes(n, dim, nlist, m, nbits)
    why = ("asked for (--index ivfpq)" if index == "ivfpq" else
           f"flat ({_human(flat)}) and HNSW ({_human(hnsw)}) are over 60 % of --max-ram or N is too large")
    rule = (f"ivfpq: {why}; nlist = min(4*sqrt(N), n_train/{MIN_PER_CELL}) = {nlist}, PQ m = {m} x {nbits} bits, "
            f"the most code bytes with N*(m+8) + nlist*D*4 within 60 % of --max-ram")
    return IndexPlan("ivfpq", n, dim, budget, est, rule,
                     {"nlist": nlist, "nprobe": min(nlist, NPROBE), "pq_m": m, "pq_nbits": nbits, "n_train": n_train})


def _new_index(plan: IndexPlan):
    faiss = _faiss()
    d = plan.dim
    if plan.index_type == "flat":
        return faiss.IndexFlatIP(d)
    if plan.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["ef_construction"]
        index.hnsw.efSearch = plan.params["ef_search"]
        return index
    p = plan.params
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, p["nlist"], p["pq_m"], p["pq_nbits"], faiss.METRIC_INNER_PRODUCT)
    index.nprobe = p["nprobe"]  # faiss's wrapper keeps `quantizer` alive with the index
    return index


def chunk_rows(budget: int, dim: int, per_row_copies: int = 1) -> int:
    """Rows per streamed chunk: float32 chunks (times `per_row_copies`) within 10 % of the budget."""
    return int(max(1024, min(CHUNK_ROWS, 0.1 * budget // (4 * dim * per_row_copies))))


def build_kind_index(emb: Embeddings, kind: str, plan: IndexPlan, exclude_from_training: np.ndarray,
                     rng: np.random.Generator, progress: Callable[[str], None]):
    """Train (IVF-PQ: on a sample read part by part) then add every vector, part by part."""
    index = _new_index(plan)
    n = emb.count(kind)
    if plan.index_type == "ivfpq":
        pool = np.setdiff1d(np.arange(n), exclude_from_training) if len(exclude_from_training) < n else np.arange(n)
        n_train = min(plan.params["n_train"], len(pool))
        sample = np.sort(rng.choice(pool, size=n_train, replace=False))
        t0 = time.perf_counter()
        index.train(emb.rows(kind, sample))
        progress(f"{kind}: trained IVF-PQ on {n_train} vectors in {time.perf_counter() - t0:.1f}s")
    for _, chunk in emb.iter_chunks(kind, chunk_rows(plan.max_ram, plan.dim)):
        index.add(chunk)
    if index.ntotal != n:
        raise SearchError(f"{kind}: the index holds {index.ntotal} vectors, the parts {n}")
    return index


def exact_kth(emb: Embeddings, kind: str, queries: np.ndarray, k: int, self_rows: np.ndarray | None,
              rows: int = CHUNK_ROWS) -> np.ndarray:
    """The exact k-th best inner product of each query over every `kind` vector, streamed
    `rows` vectors at a time (a query's own row, when given, is left out). -> float32 [Q]."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start, chunk in emb.iter_chunks(kind, rows):
        s = queries @ chunk.T  # [Q, c]
        if self_rows is not None:
            inside = np.nonzero((self_rows >= start) & (self_rows < start + len(chunk)))[0]
            s[inside, self_rows[inside] - start] = -np.inf
        both = np.concatenate([best, s], axis=1)
        if both.shape[1] > k:
            both = -np.partition(-both, k - 1, axis=1)[:, :k]
        best = both
    return best.min(axis=1)


def measure_recall(emb: Embeddings, index, kind: str, queries: np.ndarray, self_rows: np.ndarray | None,
                   k: int = RECALL_K, budget: int = 2 * 1024 ** 3) -> float:
    """recall@k of `index` (over `kind`) against exact search; ties with the exact k-th score count."""
    n = emb.count(kind) - (1 if self_rows is not None else 0)
    k = min(k, n)
    if k < 1 or len(queries) == 0:
        return float("nan")
    # score blocks [Q, rows] (and their merge: ~3 copies) within 10 % of the budget
    kth = exact_kth(emb, kind, queries, k, self_rows, chunk_rows(budget, len(queries), 3))
    _, ids = index.search(queries, k + (1 if self_rows is not None else 0))
    hits = 0
    for qi in range(len(queries)):
        row = [i for i in ids[qi] if i >= 0 and (self_rows is None or i != self_rows[qi])][:k]
        if row:
            true = emb.rows(kind, np.asarray(row)) @ queries[qi]
            hits += int(np.sum(true >= kth[qi] - 1e-5))
    return hits / (len(queries) * k)


def _concat_thumbs(emb: Embeddings, out: Path) -> dict:
    """thumbs.bin and thumbs.idx.npy of every part, concatenated in row order (streamed)."""
    n = emb.count("images")
    offsets = np.lib.format.open_memmap(out / THUMBS_IDX, mode="w+", dtype=np.int64, shape=(n + 1,))
    offsets[0] = 0
    row, base = 0, 0
    with open(out / THUMBS_BIN, "wb") as f:
        for p in emb.parts:
            idx = np.load(p.dir / THUMBS_IDX)
            if len(idx) != p.n_images + 1:
                raise SearchError(f"{p.dir / THUMBS_IDX}: {len(idx) - 1} thumbnails for {p.n_images} rows")
            with open(p.dir / THUMBS_BIN, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            offsets[row + 1:row + 1 + p.n_images] = idx[1:] + base
            row += p.n_images
            base += int(idx[-1])
    offsets.flush()
    del offsets
    return {"count": n, "side": emb.info.get("thumb_side"), "bytes": (out / THUMBS_BIN).stat().st_size}


def _write_meta(emb: Embeddings, out: Path) -> None:
    """images.jsonl (the parts' lines, concatenated) and captions.jsonl (one line per caption
    vector: {"id" of its image, "caption", "source"}), streamed part by part."""
    cap = open(out / "captions.jsonl", "w", encoding="utf-8") if emb.has_captions else None
    try:
        with open(out / "images.jsonl", "w", encoding="utf-8") as img:
            for p in emb.parts:
                lines = 0
                n_caps = 0
                with open(p.dir / "images.jsonl", encoding="utf-8") as src:
                    for line in src:
                        img.write(line)
                        lines += 1
                        if cap is not None:
                            m = json.loads(line)
                            for c in m["captions"]:
                                cap.write(json.dumps({"id": m["id"], "caption": c, "source": m["source"]},
                                                     ensure_ascii=False) + "\n")
                                n_caps += 1
                if lines != p.n_images or (cap is not None and n_caps != p.n_captions):
                    raise SearchError(f"{p.dir / 'images.jsonl'}: {lines} lines / {n_caps} captions, the marker "
                                      f"says {p.n_images} / {p.n_captions}: delete {p.dir}.done and re-embed")
    finally:
        if cap is not None:
            cap.close()


def build_index_from_parts(emb_dir: str | os.PathLike, out: str | os.PathLike, *, max_ram: int | str = "2GB",
                           index: str = "auto", recall_queries: int = 1000, seed: int = 0, overwrite: bool = False,
                           say: Callable[[str], None] | None = None) -> IndexReport:
    """An embedding directory -> a `moco_mm.index/1` directory (built beside `out`, then renamed)."""
    faiss = _faiss()
    say = say or (lambda s: None)
    budget = parse_size(max_ram)
    emb = Embeddings.open(emb_dir)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SearchError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    n, d = emb.count("images"), emb.dim
    if n == 0:
        raise SearchError(f"--emb {emb_dir}: no usable image in {len(emb.parts)} parts ({len(emb.skipped())} skipped)")
    rng = np.random.default_rng(seed)
    # Held-out queries: image rows kept out of every training sample (at most a tenth of N).
    n_q = int(min(recall_queries, max(1, n // 10))) if n > 1 else 0
    q_rows = np.sort(rng.choice(n, size=n_q, replace=False)) if n_q else np.zeros(0, np.int64)
    q_images = emb.rows("images", q_rows)
    q_texts = np.zeros((0, d), np.float32)
    if emb.has_captions and emb.count("captions"):
        nc = emb.count("captions")
        q_texts = emb.rows("captions", np.sort(rng.choice(nc, size=min(recall_queries, nc), replace=False)))
    seconds: dict[str, float] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info: dict[str, Any] = {
            "format": INDEX_FORMAT, "export": emb.info.get("export"),
            "model_fingerprint": emb.info["model_fingerprint"], "embed_dim": d, "data": emb.info.get("data"),
            "embeddings": str(Path(emb_dir).resolve()),
            "metric": "inner_product", "parts": {}, "skipped": emb.skipped(),
            "build": {"max_ram_bytes": budget, "rules": RULES, "index": index},
            "recall": {"k": RECALL_K, "image_queries": int(n_q), "text_queries": int(len(q_texts))},
        }
        kinds = ("images", "captions") if emb.has_captions and emb.count("captions") else ("images",)
        for kind in kinds:
            t0 = time.perf_counter()
            nk = emb.count(kind)
            plan = plan_index(nk, d, budget, index, nk - (n_q if kind == "images" else 0))
            say(f"{kind}: {nk} vectors -> {plan.rule} (estimated {_human(plan.estimated_bytes)})")
            built = build_kind_index(emb, kind, plan, q_rows if kind == "images" else np.zeros(0, np.int64), rng, say)
            faiss.write_index(built, str(tmp / f"{kind}.faiss"))
            seconds[f"build_{kind}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if kind == "images":
                info["recall"]["image->image"] = measure_recall(emb, built, "images", q_images, q_rows,
                                                                budget=budget)
                if len(q_texts):
                    info["recall"]["text->image"] = measure_recall(emb, built, "images", q_texts, None,
                                                                   budget=budget)
            else:
                info["recall"]["image->caption"] = measure_recall(emb, built, "captions", q_images, None,
                                                                  budget=budget)
            seconds[f"recall_{kind}"] = time.perf_counter() - t0
            info["parts"][kind] = {"count": nk, "faiss_bytes": (tmp / f"{kind}.faiss").stat().st_size,
                                   "index_type": plan.index_type, "rule": plan.rule,
                                   "estimated_bytes": plan.estimated_bytes, **plan.params}
            del built
        _write_meta(emb, tmp)
        info["thumbnails"] = _concat_thumbs(emb, tmp)
        info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexReport(out, info, seconds)


RULES = {
    "index_share_of_max_ram": INDEX_SHARE, "train_share_of_max_ram": TRAIN_SHARE,
    "flat": f"N*D*4 <= {INDEX_SHARE} * max_ram and N <= {FLAT_MAX_N}",
    "hnsw": f"not flat, N*(4*D + 8*M)*1.1 <= {INDEX_SHARE} * max_ram and N <= {HNSW_MAX_N}, M = {HNSW_M}",
    "ivfpq": (f"otherwise: nlist = min(4*sqrt(N), n_train/{MIN_PER_CELL}); PQ m = largest of {list(PQ_M)} dividing "
              f"D with N*(m+8) + nlist*D*4 <= {INDEX_SHARE} * max_ram; nbits 8 (fewer when n_train < "
              f"{MIN_PER_CELL * 256}); nprobe = min(nlist, {NPROBE}); trained on <= {TRAIN_SHARE} * max_ram of "
              f"float32 vectors sampled uniformly"),
    "recall": "recall@10 vs exact inner product; held-out image rows (own row excluded) and caption vectors as "
              "queries; a hit reaches the exact 10th score",
}
