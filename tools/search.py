"""`python tools/search.py ARGS` is `moco-mm search ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["search", *sys.argv[1:]]))
