"""`python tools/plan_memory.py ARGS` is `moco-mm plan-memory ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["plan-memory", *sys.argv[1:]]))
