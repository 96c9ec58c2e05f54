"""`python tools/eval_zeroshot.py ARGS` is `moco-mm eval-zeroshot ARGS`."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["eval-zeroshot", *sys.argv[1:]]))
