"""moco_mm: MoCo-style dual-queue image-text contrastive pretraining.

The library (this package) holds the algorithm and its parts; `moco_mm.train` is the
training program built on it, and `tools/` holds command-line programs around it.
"""

__version__ = "0.1.0"
