"""`[torchrun --nproc_per_node=N] python -m moco_mm.embed --export E --data SHARDS --out EMB_DIR`
(same as `moco-mm embed`; the program is moco_mm.search.embed)."""

import sys

from moco_mm.search.embed import main

if __name__ == "__main__":
    sys.exit(main())
