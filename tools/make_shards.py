"""`python tools/make_shards.py ARGS` is `moco-mm make-shards ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["make-shards", *sys.argv[1:]]))
