"""`python tools/eval_retrieval.py ARGS` is `moco-mm eval-retrieval ARGS` (kept for existing command lines)."""

import sys

from moco_mm.cli import main

if __name__ == "__main__":  # guarded: worker processes re-import this file
    sys.exit(main(["eval-retrieval", *sys.argv[1:]]))
