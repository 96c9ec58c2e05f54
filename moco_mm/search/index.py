"""Embedding and search with an exported encoder (no training code or config needed).

    enc = Encoder.from_export("exports/demo")          # checks manifest sha256s first
    img = enc.encode_images(["a.jpg", pil_image])      # float32 [N, D], unit rows
    txt = enc.encode_texts(["a red circle"])           # float32 [M, D], unit rows
    scores = txt @ img.T                               # cosine similarity

    report = build_index(enc, "data/val/manifest.json", "index/demo", captions=True)
    idx = SearchIndex.load("index/demo", "images")      # or "captions"
    hits = idx.search(txt, k=5)                         # [M][k] Hit(rank, score, meta)

    metrics = evaluate_retrieval(enc, "data/val/manifest.json")  # R@1/5/10, medr both ways

An index directory holds, per kind (`images`, `captions`):
    KIND.faiss   a FAISS index over unit embeddings with inner product (= cosine) scores
    KIND.jsonl   line i describes vector i: images {"id", "source", "captions"},
                 captions {"id" (the image's), "caption", "source"}
and `index.json` (written last): format, export path, model fingerprint, embed_dim, the
index type and its parameters, counts and skipped inputs.

Loading an export executes no pickled code: JSON, safetensors and a tokenizer.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import safetensors.torch
import torch
from PIL import Image, ImageOps

from moco_mm.data import (DataError, ShardSource, build_transforms, decode_sample, iter_eval_batches,
                          iter_raw_samples)
from moco_mm.encoders import ImageTower, TextTower
from moco_mm.export import SPEC, ExportError, ExportSpec, model_fingerprint, rebuild_towers, verify_export
from moco_mm.metrics import retrieval_metrics
from moco_mm.shards import MANIFEST, ImageError, InputError, decode_image, read_rows, to_rgb

log = logging.getLogger(__name__)

INDEX_FORMAT = "moco_mm.index/1"
INDEX_INFO = "index.json"
KINDS = ("images", "captions")
INDEX_TYPES = ("flat", "ivf", "hnsw")

ImageInput = str | os.PathLike | Image.Image


class SearchError(RuntimeError):
    """An index or input cannot be used; the message names the file or option."""


# ---------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> Image.Image:
    """A file -> upright 8-bit RGB, the way make_shards stores training images. Raises
    ImageError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: unreadable: {e}") from None
    try:
        img = decode_image(data)
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation, as make_shards applies it
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


class Encoder:
    """Both towers of an export, in eval mode, with their tokenizer and image transform.

    encode_images(images)  -> float32 [N, D], unit rows (N = len(images))
    encode_texts(texts)    -> float32 [M, D], unit rows
    image_features / text_features take preprocessed tensors and return torch [N, D].
    """

    def __init__(self, spec: ExportSpec, image_tower: ImageTower, text_tower: TextTower, tokenizer: Any,
                 fingerprint: str = "", root: Path | None = None, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.image_tower = image_tower.eval().to(self.device)
        self.text_tower = text_tower.eval().to(self.device)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.root = root
        self.transform = build_transforms(spec.image.image_size, spec.image.mean, spec.image.std, train=False)

    @classmethod
    def from_export(cls, root: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> "Encoder":
        """Load an export directory. `verify` checks every file's sha256 against the
        manifest first (sizes are always checked) and refuses unlisted files."""
        from transformers import AutoTokenizer

        root = Path(root)
        manifest = verify_export(root, check_hashes=verify)
        spec = ExportSpec.from_json((root / SPEC).read_text(encoding="utf-8"), str(root / SPEC))
        image, text = rebuild_towers(root, spec)
        for tower, name in ((image, spec.image.weights), (text, spec.text.weights)):
            try:
                tower.load_state_dict(safetensors.torch.load_file(root / name, device="cpu"), strict=True)
            except (RuntimeError, OSError) as e:  # wrong keys/shapes, or a damaged header
                raise ExportError(f"{root / name}: does not fit {SPEC}: {e}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root / spec.text.hf_dir))
        except (OSError, ValueError) as e:
            raise ExportError(f"{root / spec.text.hf_dir}: cannot load the tokenizer: {e}") from e
        return cls(spec, image, text, tokenizer, model_fingerprint(manifest, spec), root, device)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def max_length(self) -> int:
        return self.spec.text.max_length

    # -- tensors in, tensors out ---------------------------------------------------------

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values float32 [N,3,H,W] (after `preprocess`) -> float32 [N,D] unit rows."""
        return self.image_tower(pixel_values.to(self.device)).float().cpu()

    @torch.inference_mode()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask int64 [N,L] -> float32 [N,D] unit rows."""
        return self.text_tower(input_ids.to(self.device), attention_mask.to(self.device)).float().cpu()

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Paths or PIL images -> float32 [N,3,S,S], exactly the eval transform of training."""
        pil = [load_image(x) if not isinstance(x, Image.Image) else to_rgb(x) for x in images]
        return torch.stack([self.transform(p) for p in pil])

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask int64 [N, max_length]: padded to max_length as in
        training and eval, so an embedding never depends on the rest of its batch."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return tok["input_ids"].long(), tok["attention_mask"].long()

    # -- the public API ------------------------------------------------------------------

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Paths or PIL images -> float32 [N, D], L2-normalised rows, in input order."""
        out = [self.image_features(self.preprocess(images[i:i + batch_size]))
               for i in _batches(len(images), batch_size, progress, "images")]
        return _stack(out, self.embed_dim)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Strings -> float32 [N, D], L2-normalised rows, in input order."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string")
        out = [self.text_features(*self.tokenize(texts[i:i + batch_size]))
               for i in _batches(len(texts), batch_size, progress, "texts")]
        return _stack(out, self.embed_dim)


def _batches(n: int, batch_size: int, progress: bool, unit: str) -> Iterable[int]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm import tqdm

    return tqdm(starts, desc=f"embedding {unit}", unit="batch")


def _stack(parts: list[torch.Tensor], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Corpora: shards, image folders, CSV/TSV/JSONL
# ---------------------------------------------------------------------------------------


@dataclass
class Item:
    """One corpus image: `image` is a path (loaded lazily) or an already decoded image."""

    id: int
    source: str
    captions: list[str]
    image: str | Image.Image


_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def _is_shard_spec(data: str) -> bool:
    """Shards: a manifest, a folder of tars, brace patterns, pipe: URLs. Otherwise a
    table (CSV/TSV/JSONL) or a folder of image files."""
    p = Path(data)
    if p.is_dir():
        return (p / MANIFEST).is_file() or any(p.glob("*.tar"))
    return p.suffix.lower() not in _TABLE_SUFFIXES


def corpus_size(data: str | os.PathLike) -> int | None:
    """Samples in the corpus when cheaply known (shard counts, table rows), else None."""
    data = str(data)
    try:
        if _is_shard_spec(data):
            return ShardSource.from_spec(data).total_samples
        return len(read_rows(data))
    except (DataError, InputError):
        return None  # iter_items raises the same error with its message


def iter_items(data: str | os.PathLike, skipped: list[dict] | None = None) -> Iterator[Item]:
    """The images of a corpus, in a fixed order.

    data: a shard spec (manifest.json, shard folder, brace pattern; see ShardSource), a
    folder of images (same-stem .txt captions optional; ids = sorted position), or a
    CSV/TSV/JSONL with `image` and `caption` columns (ids = row position). Samples that
    cannot be read are appended to `skipped` ({"source", "reason"}) instead of raising.
    """
    skipped = skipped if skipped is not None else []
    data = str(data)
    if _is_shard_spec(data):
        source = ShardSource.from_spec(data)
        counts = source.counts or (None,) * len(source.urls)
        for url, count in zip(source.urls, counts):
            for raw in iter_raw_samples(url, lambda u, e: log.warning("shard %s ended early: %s", u, e), count):
                try:
                    dec = decode_sample(raw)
                except Exception as e:  # data._BadSample: a corrupt sample is skipped, not fatal
                    skipped.append({"source": f"{url}:{raw.key}", "reason": str(e)})
                    continue
                yield Item(dec.sample_id, _shard_source(raw, url), dec.captions, dec.image)
        return
    try:
        rows = read_rows(data)
    except InputError as e:
        raise SearchError(str(e)) from None
    for row in rows:
        if row.error:
            skipped.append({"source": row.image, "reason": row.error})
            continue
        path = Path(row.base) / row.image
        yield Item(row.index, str(path), _row_captions(row), str(path))


def _shard_source(raw, url: str) -> str:
    """The original image path make_shards recorded, else shard:key."""
    try:
        meta = json.loads(raw.members["json"].decode("utf-8"))
        if isinstance(meta.get("source"), str) and meta["source"]:
            return meta["source"]
    except (KeyError, ValueError, AttributeError):
        pass
    return f"{url}:{raw.key}"


def _row_captions(row) -> list[str]:
    """Captions are optional when indexing: a folder image without its .txt has none."""
    if row.caption_file is not None:
        try:
            text = Path(row.caption_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return []
        return [c.strip() for c in text.splitlines() if c.strip()]
    return [c.strip() for c in (row.captions or ()) if c.strip()]


# ---------------------------------------------------------------------------------------
# FAISS indexes
# ---------------------------------------------------------------------------------------


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
            hint = " (build it with `tools/search.py index ... --captions`)" if kind == "captions" else ""
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

    def flush() -> None:
        pixels = torch.stack([encoder.transform(img) for _, img in pending])
        chunks.append(encoder.image_features(pixels).numpy())
        metas.extend({"id": it.id, "source": it.source, "captions": it.captions} for it, _ in pending)
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
        (tmp / INDEX_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexReport(out, info, seconds)


# ---------------------------------------------------------------------------------------
# Retrieval evaluation
# ---------------------------------------------------------------------------------------


def evaluate_retrieval(encoder: Encoder, data: str | os.PathLike, *, max_samples: int | None = None,
                       batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """Image<->text retrieval on every sample of the shards `data`, all captions kept.

    -> moco_mm.metrics.retrieval_metrics (i2t_R@1/5/10, i2t_medr, t2i_*; recalls in
    percent) plus n_images and n_captions. An image query hits at k when any of its
    captions is in its top k; each caption query has exactly its own image.
    """
    source = ShardSource.from_spec(str(data))
    images, texts, owner = [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="embedding", unit="img")
    for batch in iter_eval_batches(source, batch_size=batch_size, transform=encoder.transform,
                                   tokenizer=encoder.tokenizer, max_length=encoder.max_length,
                                   max_samples=max_samples):
        offset = sum(len(x) for x in images)
        images.append(encoder.image_features(batch["image"]))
        texts.append(encoder.text_features(batch["input_ids"], batch["attention_mask"]))
        # Owners by position, not by sample_id: ids need not be unique across shard sets.
        owner.extend(offset + i for i, caps in enumerate(batch["captions"]) for _ in caps)
        if bar is not None:
            bar.update(len(batch["captions"]))
    if bar is not None:
        bar.close()
    if not images:
        raise SearchError(f"--data {data}: no usable sample")
    img, txt = torch.cat(images), torch.cat(texts)
    metrics = retrieval_metrics(img @ txt.t(), torch.tensor(owner, dtype=torch.long))
    metrics["n_images"], metrics["n_captions"] = float(len(img)), float(len(txt))
    return metrics
