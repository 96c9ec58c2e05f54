"""FAISS indexes over exported embeddings.

    report = build_index(enc, "data/val/manifest.json", "index/demo", captions=True)
    idx = SearchIndex.load("index/demo", "images")      # or "captions"
    hits = idx.search(txt, k=5)                         # [M][k] Hit(rank, score, meta)

An index directory holds, per kind (`images`, `captions`):
    KIND.faiss   a FAISS index over unit embeddings with inner product (= cosine) scores
    KIND.jsonl   line i describes vector i: images {"id", "source", "captions"},
                 captions {"id" (the image's), "caption", "source"}
and `index.json` (written last): format, export path, model fingerprint, embed_dim, the
index type and its parameters, counts and skipped inputs; `thumbs.bin` + `thumbs.idx.npy`
hold a small JPEG of every image row (moco_mm.search.thumbs), so a server shows results
without opening any source path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from moco_mm.data.make_shards import ImageError
from moco_mm.search.corpus import Item, corpus_size, iter_items
from moco_mm.search.encoder import Encoder, SearchError, load_image
from moco_mm.search.thumbs import THUMBS_BIN, ThumbWriter

log = logging.getLogger(__name__)

INDEX_FORMAT = "moco_mm.index/1"
INDEX_INFO = "index.json"
KINDS = ("images", "captions")
INDEX_TYPES = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("search indexes need FAISS: pip install 'moco-mm[search]' (faiss-cpu)") from None
    return faiss


@dataclass
class IndexParams:
    """flat: exact inner product. ivf: `nlist` k-means cells (0: about 4*sqrt(N)), searched
    `nprobe` at a time. hnsw: graph with `hnsw_m` links per node, `ef_search` at query."""

    index_type: str = "flat"
    nlist: int = 0
    nprobe: int = 8
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def validate(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise SearchError(f"--index {self.index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise SearchError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise SearchError(f"--nlist: must be >= 0, got {self.nlist}")


def make_faiss_index(vectors: np.ndarray, params: IndexParams) -> tuple[Any, dict]:
    """Unit vectors float32 [N, D] -> (a FAISS index holding them in order, the parameters
    used). Scores are inner products, i.e. cosine similarity."""
    faiss = _faiss()
    params.validate()
    n, d = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    used: dict[str, Any] = {"index_type": params.index_type}
    if params.index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.index_type == "ivf":
        nlist = params.nlist or max(1, int(4 * np.sqrt(n)))
        if nlist > n:
            raise SearchError(f"--nlist {nlist}: IVF needs at least as many vectors as cells, the corpus has {n}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)  # k-means on the corpus itself
        index.nprobe = min(params.nprobe, nlist)
        used.update(nlist=nlist, nprobe=index.nprobe)
    else:
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
        used.update(hnsw_m=params.hnsw_m, ef_construction=params.ef_construction, ef_search=params.ef_search)
    if n:
        index.add(vectors)
    return index, used


@dataclass
class Hit:
    rank: int  # 1-based
    score: float  # inner product of unit vectors (cosine)
    meta: dict  # the KIND.jsonl line of the hit


class SearchIndex:
    """One kind (`images` or `captions`) of an index directory, loaded for queries."""

    def __init__(self, root: Path, kind: str, index: Any, meta: list[dict], info: dict):
        self.root, self.kind, self.index, self.meta, self.info = root, kind, index, meta, info

    @classmethod
    def load(cls, root: str | os.PathLike, kind: str = "images", nprobe: int | None = None,
             ef_search: int | None = None) -> "SearchIndex":
        faiss = _faiss()
        root = Path(root)
        info = read_index_info(root)
        if kind not in KINDS:
            raise SearchError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        part = info["parts"].get(kind)
        if part is None:
            hint = " (build it with `moco-mm search index ... --captions`)" if kind == "captions" else ""
            raise SearchError(f"{root}: holds no {kind} index{hint}")
        path = root / f"{kind}.faiss"
        if not path.is_file() or path.stat().st_size != part["faiss_bytes"]:
            raise SearchError(f"{path}: missing or not the size {INDEX_INFO} records: rebuild the index")
        index = faiss.read_index(str(path))
        meta = [json.loads(line) for line in (root / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines()]
        if index.ntotal != len(meta) or len(meta) != part["count"]:
            raise SearchError(f"{root}: {kind}.faiss holds {index.ntotal} vectors, {kind}.jsonl {len(meta)} "
                              f"lines, {INDEX_INFO} says {part['count']}: rebuild the index")
        if nprobe is not None and hasattr(index, "nprobe"):
            index.nprobe = nprobe
        if ef_search is not None and hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef_search
        return cls(root, kind, index, meta, info)

    def __len__(self) -> int:
        return len(self.meta)

    def check_encoder(self, encoder: Encoder) -> None:
        """Refuse queries embedded by another model than the one that built the index."""
        want = self.info["model_fingerprint"]
        if encoder.fingerprint != want:
            raise SearchError(
                f"{self.root} was built with export {self.info['export']} (fingerprint {want}); the given "
                f"export has fingerprint {encoder.fingerprint}: its embeddings are not comparable. Query with "
                f"the export that built the index, or rebuild the index")

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """queries float32 [Q, D] (unit rows) -> for each, up to k hits, best first."""
        if k < 1:
            raise SearchError(f"-k must be >= 1, got {k}")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.info["embed_dim"]:
            raise SearchError(f"queries have dimension {q.shape[1]}, the index {self.info['embed_dim']}")
        scores, ids = self.index.search(q, min(k, max(len(self), 1)))
        return [[Hit(r + 1, float(s), self.meta[i]) for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
                for srow, irow in zip(scores, ids)]


def read_index_info(root: Path) -> dict:
    try:
        info = json.loads((root / INDEX_INFO).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{root}: no {INDEX_INFO}: not an index directory, or indexing did not finish") from None
    except (OSError, ValueError) as e:
        raise SearchError(f"{root / INDEX_INFO}: unreadable: {e}") from None
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        raise SearchError(f"{root / INDEX_INFO}: not a {INDEX_FORMAT} index")
    return info


@dataclass
class IndexReport:
    out: Path
    info: dict
    seconds: dict[str, float] = field(default_factory=dict)


def build_index(encoder: Encoder, data: str | os.PathLike, out: str | os.PathLike, *,
                params: IndexParams | None = None, captions: bool = False, batch_size: int = 64,
                max_samples: int | None = None, progress: bool = False, overwrite: bool = False) -> IndexReport:
    """Embed every image of `data` (and, with `captions`, every caption) into `out`.

    The directory appears whole (built beside it, then renamed). Unreadable images are
    skipped and listed in index.json; an empty corpus is an error.
    """
    faiss = _faiss()
    params = params or IndexParams()
    params.validate()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SearchError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
    skipped: list[dict] = []
    metas: list[dict] = []
    chunks: list[np.ndarray] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        total = corpus_size(data)
        if total is not None and max_samples is not None:
            total = min(total, max_samples)
        bar = tqdm(desc="embedding images", unit="img", total=total)
    pending: list[tuple[Item, Image.Image]] = []
    thumbs = ThumbWriter()

    def flush() -> None:
        pixels = torch.stack([encoder.transform(img) for _, img in pending])  # uint8 [n,3,S,S]
        chunks.append(encoder.image_features(encoder.normalize(pixels)).numpy())
        metas.extend({"id": it.id, "source": it.source, "captions": it.captions} for it, _ in pending)
        for _, img in pending:
            thumbs.add(img)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    for n, item in enumerate(iter_items(data, skipped)):
        if max_samples is not None and n >= max_samples:
            break
        try:
            img = item.image if isinstance(item.image, Image.Image) else load_image(item.image)
        except ImageError as e:
            skipped.append({"source": item.source, "reason": str(e)})
            continue
        pending.append((item, img))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if bar is not None:
        bar.close()
    if not metas:
        raise SearchError(f"--data {data}: no usable image ({len(skipped)} skipped"
                          + (f", e.g. {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else "") + ")")
    image_vectors = np.concatenate(chunks)
    seconds = {"embed_images": time.perf_counter() - t0}

    parts: dict[str, tuple[np.ndarray, list[dict]]] = {"images": (image_vectors, metas)}
    if captions:
        t0 = time.perf_counter()
        cap_meta = [{"id": m["id"], "caption": c, "source": m["source"]} for m in metas for c in m["captions"]]
        if not cap_meta:
            raise SearchError(f"--captions: the corpus {data} has no captions")
        cap_vectors = encoder.encode_texts([m["caption"] for m in cap_meta], batch_size=max(batch_size, 256),
                                           progress=progress)
        parts["captions"] = (cap_vectors, cap_meta)
        seconds["embed_captions"] = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info: dict[str, Any] = {
            "format": INDEX_FORMAT, "export": str(encoder.root.resolve()) if encoder.root else None,
            "model_fingerprint": encoder.fingerprint, "embed_dim": encoder.embed_dim, "data": str(data),
            "metric": "inner_product", "parts": {}, "skipped": skipped,
        }
        for kind, (vectors, meta) in parts.items():
            t0 = time.perf_counter()
            index, used = make_faiss_index(vectors, params)
            faiss.write_index(index, str(tmp / f"{kind}.faiss"))
            with open(tmp / f"{kind}.jsonl", "w", encoding="utf-8") as f:
                for m in meta:
                    f.write(json.dumps(m, ensure_ascii=False) + "\n")
            info["parts"][kind] = {"count": len(meta), "faiss_bytes": (tmp / f"{kind}.faiss").stat().st_size, **used}
            seconds[f"build_{kind}"] = time.perf_counter() - t0
        thumbs.write(tmp)  # row i of images.jsonl: what a server shows, without opening any source path
        info["thumbnails"] = {"count": len(thumbs), "side": thumbs.side, "bytes": (tmp / THUMBS_BIN).stat().st_size}
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexReport(out, info, seconds)
