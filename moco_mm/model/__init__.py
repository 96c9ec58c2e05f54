"""The algorithm: towers, the feature queue, the objectives, and the dual-queue model.

    towers.py      timm / Hugging Face backbones + projection head + L2 norm (ImageTower, TextTower)
    clip_towers.py towers that start from an OpenCLIP or Hugging Face CLIP (model.init_from)
    queue.py       FeatureQueue: a ring buffer of keys and their sample ids
    losses.py      the objectives, all with queue_infonce's signature (pure functions)
    dual_queue.py  DualQueueMoCo: the whole training step in one class

Imports: this package uses only the base modules (config, distributed, metrics) and
itself. It never imports `moco_mm.data` (its sibling) or anything above it (train, plan,
search, bench, cli); tests/test_layout.py checks this.
"""

from moco_mm.model.clip_towers import ClipSource, clip_towers, open_clip_tokenizer, resolve_init
from moco_mm.model.dual_queue import DualQueueMoCo, KeyTowers, QueryTowers, StepOutput, momentum_at, negative_bank
from moco_mm.model.losses import LOSSES, queue_infonce, vse_max, vse_sum
from moco_mm.model.queue import FeatureQueue
from moco_mm.model.towers import (
    ImageTower,
    Projection,
    TextTower,
    build_towers,
    has_batchnorm,
    hf_text_tower,
    load_tokenizer,
    timm_image_tower,
    tower_blocks,
)

__all__ = [
    "DualQueueMoCo", "QueryTowers", "KeyTowers", "StepOutput", "momentum_at", "negative_bank",
    "LOSSES", "queue_infonce", "vse_max", "vse_sum", "FeatureQueue",
    "ImageTower", "TextTower", "Projection", "build_towers", "has_batchnorm", "load_tokenizer",
    "timm_image_tower", "hf_text_tower",
    "tower_blocks", "ClipSource", "clip_towers", "open_clip_tokenizer", "resolve_init",
]
