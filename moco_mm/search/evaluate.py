"""Retrieval evaluation of an export on a held-out set: R@1/5/10, median rank and rsum both
ways, several captions per image (an image hits when any of its captions is in its top k),
and the standard COCO / Flickr30k tables.

    metrics = evaluate_retrieval(enc, "data/val/manifest.json")             # the whole set
    report = evaluate_protocol(enc, "coco/test/manifest.json")              # protocol from the manifest
    report.tables["coco-5k"], report.tables["coco-1k"]

Protocols (`--protocol`; names and set sizes in moco_mm.data.karpathy.EVAL_PROTOCOLS):
  plain       one table, "all": every image and caption of the shards (the default for
              shards that record no protocol).
  coco-5k-1k  Karpathy's COCO test split: "coco-5k", all 5,000 images / 25,000 captions, and
              "coco-1k", the mean of each number over the five folds of 1,000 consecutive
              images (in shard order = the JSON's order) with their captions, each fold
              ranked on its own. `fold_size` (1,000) is a parameter for tests only.
  flickr-1k   Karpathy's Flickr30k test split: "flickr-1k", all 1,000 images / 5,000 captions.
  auto        the `eval_protocol` that `make-shards --format coco-karpathy|flickr30k-karpathy`
              wrote into the manifest of `data` (coco-5k-1k / flickr-1k for test, plain for
              train and val), plain when there is none or when only `max_samples` are used.
Every table is moco_mm.metrics.retrieval_metrics (a fold's too) plus `rsum`, the sum of the
six recalls that papers report. A set whose image count is not the standard one is still
evaluated, with a warning in the report: its numbers are not comparable to published ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from moco_mm.data import ShardSource, iter_eval_batches
from moco_mm.data.karpathy import EVAL_PROTOCOLS, read_eval_protocol
from moco_mm.metrics import KS, retrieval_metrics
from moco_mm.search.encoder import Encoder, SearchError

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", *EVAL_PROTOCOLS)
FOLD_SIZE = 1000  # images per fold of the COCO 1k protocol


@dataclass
class RetrievalReport:
    """`tables`: name -> metrics (retrieval_metrics keys, `rsum`, `n_images`, `n_captions`;
    a fold mean also `n_folds` and `fold_size`), the whole set first. `folds`: each COCO 1k
    fold's own table. `warnings`: why the numbers may not match the standard protocol."""

    protocol: str
    tables: dict[str, dict[str, float]]
    folds: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def whole(self) -> dict[str, float]:
        """The table of the whole set (plain: "all"; coco-5k-1k: "coco-5k"; flickr-1k)."""
        return next(iter(self.tables.values()))


def rsum(m: dict[str, float], ks=KS) -> float:
    """R@1 + R@5 + R@10, image->text plus text->image (percent; 600 is perfect)."""
    return sum(m[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)


def _table(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    m = retrieval_metrics(img @ txt.t(), owner)
    m["rsum"] = rsum(m)
    m["n_images"], m["n_captions"] = float(len(img)), float(len(txt))
    return m


def protocol_tables(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, protocol: str = "plain", *,
                    fold_size: int = FOLD_SIZE) -> RetrievalReport:
    """The protocol's tables from embeddings: img [N,D], txt [M,D], owner [M] (caption j's
    image is img[owner[j]]). The COCO folds are images [f*fold_size, (f+1)*fold_size) with
    the captions they own; images past the last full fold are left out of the fold mean
    (with a warning); fewer images than one fold is an error."""
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose one of {', '.join(EVAL_PROTOCOLS)}")
    if fold_size < 1:
        raise ValueError(f"fold_size must be >= 1, got {fold_size}")
    owner = owner.long()
    n_img = len(img)
    warnings = []
    expected = EVAL_PROTOCOLS[protocol]
    if expected is not None and n_img != expected:
        warnings.append(f"{protocol}: the standard test set has {expected} images, this one {n_img} (images "
                        f"skipped by make-shards, see the shards' manifest.json, or not that test split): "
                        f"the numbers are not comparable to published ones")
    whole = _table(img, txt, owner)
    if protocol == "plain":
        return RetrievalReport(protocol, {"all": whole}, warnings=warnings)
    if protocol == "flickr-1k":
        return RetrievalReport(protocol, {"flickr-1k": whole}, warnings=warnings)
    n_folds = n_img // fold_size
    if n_folds == 0:
        raise SearchError(f"coco-5k-1k: {n_img} images is fewer than one fold of {fold_size}; "
                          f"use --protocol plain for a subset")
    if n_img % fold_size:
        warnings.append(f"coco-5k-1k: the 1k table averages {n_folds} folds of {fold_size} images; the last "
                        f"{n_img % fold_size} images are in no fold")
    folds = []
    for f in range(n_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        sel = (owner >= lo) & (owner < hi)
        folds.append(_table(img[lo:hi], txt[sel], owner[sel] - lo))
    mean = {k: sum(t[k] for t in folds) / n_folds for k in folds[0]}
    mean["n_folds"], mean["fold_size"] = float(n_folds), float(fold_size)
    return RetrievalReport(protocol, {"coco-5k": whole, "coco-1k": mean}, folds, warnings)


def resolve_protocol(protocol: str, data: str | os.PathLike, max_samples: int | None = None) -> str:
    """`auto` -> the manifest's eval_protocol (plain when none, or when max_samples cuts the set)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol != "auto":
        return protocol
    if max_samples is not None:
        return "plain"
    return read_eval_protocol(data) or "plain"


def embed_eval_set(encoder: Encoder, data: str | os.PathLike, *, max_samples: int | None = None,
                   batch_size: int = 64, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sample of the shards `data` (shard order), all captions kept -> (img [N,D],
    txt [M,D], owner [M]): caption j belongs to image owner[j]."""
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
        images.append(encoder.image_features(encoder.normalize(batch["image"])))  # uint8 -> float32
        texts.append(encoder.text_features(batch["input_ids"], batch["attention_mask"]))
        # Owners by position, not by sample_id: ids need not be unique across shard sets.
        owner.extend(offset + i for i, caps in enumerate(batch["captions"]) for _ in caps)
        if bar is not None:
            bar.update(len(batch["captions"]))
    if bar is not None:
        bar.close()
    if not images:
        raise SearchError(f"--data {data}: no usable sample")
    return torch.cat(images), torch.cat(texts), torch.tensor(owner, dtype=torch.long)


def evaluate_protocol(encoder: Encoder, data: str | os.PathLike, protocol: str = "auto", *,
                      fold_size: int = FOLD_SIZE, max_samples: int | None = None, batch_size: int = 64,
                      progress: bool = False) -> RetrievalReport:
    """Embed `data` and compute the tables of `protocol` (module docstring; `auto` resolved
    with `resolve_protocol`)."""
    name = resolve_protocol(protocol, data, max_samples)
    img, txt, owner = embed_eval_set(encoder, data, max_samples=max_samples, batch_size=batch_size,
                                     progress=progress)
    return protocol_tables(img, txt, owner, name, fold_size=fold_size)


def evaluate_retrieval(encoder: Encoder, data: str | os.PathLike, *, max_samples: int | None = None,
                       batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """Image<->text retrieval on every sample of the shards `data`, all captions kept.

    -> moco_mm.metrics.retrieval_metrics (i2t_R@1/5/10, i2t_medr, t2i_*; recalls in
    percent) plus rsum, n_images and n_captions. An image query hits at k when any of its
    captions is in its top k; each caption query has exactly its own image.
    """
    return evaluate_protocol(encoder, data, "plain", max_samples=max_samples, batch_size=batch_size,
                             progress=progress).whole
