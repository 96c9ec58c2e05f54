"""`python tools/bench_loader.py ARGS` is `moco-mm bench-loader ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["bench-loader", *sys.argv[1:]]))
