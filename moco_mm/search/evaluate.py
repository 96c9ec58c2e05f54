"""Retrieval evaluation of an export on a held-out set: R@1/5/10 and median rank both
ways, several captions per image (an image hits when any of its captions is in its top k).

    metrics = evaluate_retrieval(enc, "data/val/manifest.json")
"""

from __future__ import annotations

import logging
import os

import torch

from moco_mm.data import ShardSource, iter_eval_batches
from moco_mm.metrics import retrieval_metrics

log = logging.getLogger(__name__)

from moco_mm.search.encoder import Encoder, SearchError


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
    img, txt = torch.cat(images), torch.cat(texts)
    metrics = retrieval_metrics(img @ txt.t(), torch.tensor(owner, dtype=torch.long))
    metrics["n_images"], metrics["n_captions"] = float(len(img)), float(len(txt))
    return metrics
