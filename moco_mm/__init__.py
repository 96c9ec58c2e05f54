"""moco_mm: MoCo-style dual-queue image-text contrastive pretraining.

The package is layered; imports flow one way (tests/test_layout.py checks it):

    config.py distributed.py metrics.py    base: every other part may import these
    model/   data/                         the algorithm; the data path (siblings: never each other)
    train/   plan/                         the training program; the memory planner
    search/  bench/                        export, embedding, indexes; benchmarks (may read train's checkpoints)
    cli.py                                 `moco-mm <command>`: nothing imports it

Library (model, data, plan, search) and programs (`moco-mm train`, `moco-mm export`, ...;
each a `main(argv)` in its concern's cli.py) are separate, as in OpenCLIP.
"""

__version__ = "0.1.0"
