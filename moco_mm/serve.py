"""`python -m moco_mm.serve --index INDEX_DIR [--export E] [--port 8000]`: the same program as
`moco-mm serve` (moco_mm.search.serve), under the name the README gives it."""

import sys

from moco_mm.search.serve import main

if __name__ == "__main__":
    sys.exit(main())
