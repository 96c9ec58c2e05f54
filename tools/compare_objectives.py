"""`python tools/compare_objectives.py ARGS` is `moco-mm compare-objectives ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["compare-objectives", *sys.argv[1:]]))
