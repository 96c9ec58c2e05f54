"""`python tools/gpu_check.py ARGS` is `moco-mm gpu-check ARGS` (run it first on a new GPU machine)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["gpu-check", *sys.argv[1:]]))
