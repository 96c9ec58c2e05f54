"""Raw image-caption pairs -> shards -> manifests -> exact, resumable batches; the demo set.

Read top to bottom, the data path is:

    make_shards.py  CSV/TSV/JSONL/image folder -> webdataset tars + manifest.json
    karpathy.py     COCO / Flickr30k Karpathy split JSON -> make_shards rows, one folder per split
    shard_io.py     URL patterns, opening local/pipe:/http(s) shards, tar members
    sources.py      a shard spec -> ShardSource (URLs + samples per shard)
    samples.py      tar members -> RawSample -> decoded (sample_id, captions, image, fingerprints)
    fingerprints.py stable 63-bit fingerprints of caption text, image pixels, bytes, groups
    transforms.py   image -> uint8 tensor (random draws from a given generator); .normalize(batch)
                    -> float32, run by the consumer on its device
    loader.py       the epoch plan, the exact resumable training stream (one DataLoader for the
                    run: make_stream; one epoch: make_loader), the eval stream
    labeled.py      an image folder or labelled shards -> (uint8 pixels, class index) batches,
                    checked against a classes file (zero-shot classification)
    demo.py         the procedural demo set and its locally trained tokenizer

Imports: this package uses only the base modules (config, distributed, metrics) and
itself. It never imports `moco_mm.model` (its sibling) or anything above it (train, plan,
search, bench, cli); tests/test_layout.py checks this.
"""

from moco_mm.data.fingerprints import (
                                       FINGERPRINT_COLUMNS,
                                       bytes_fingerprint,
                                       group_fingerprint,
                                       image_fingerprint,
                                       normalize_caption,
                                       text_fingerprint,
)
from moco_mm.data.loader import (
                                 BatchStream,
                                 EpochLoader,
                                 EpochPlan,
                                 LoaderState,
                                 choose_caption,
                                 iter_eval_batches,
                                 make_loader,
                                 make_stream,
                                 pin_memory_for,
                                 plan_epoch,
                                 steps_per_epoch,
)
from moco_mm.data.samples import Decoded, RawSample, decode_sample, iter_raw_samples
from moco_mm.data.sources import DataError, ShardSource, count_samples
from moco_mm.data.transforms import ImageTransform, build_transforms

__all__ = [
    "DataError", "ShardSource", "count_samples", "RawSample", "iter_raw_samples", "Decoded", "decode_sample",
    "ImageTransform", "build_transforms", "EpochPlan", "plan_epoch", "steps_per_epoch", "LoaderState",
    "EpochLoader", "make_loader", "BatchStream", "make_stream", "pin_memory_for", "iter_eval_batches",
    "choose_caption", "FINGERPRINT_COLUMNS",
    "normalize_caption", "text_fingerprint", "image_fingerprint", "bytes_fingerprint", "group_fingerprint",
]
