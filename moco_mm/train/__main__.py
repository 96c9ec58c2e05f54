"""`python -m moco_mm.train --config configs/NAME.yaml [dotted.key=value ...]` (same as `moco-mm train`)."""

import sys

from moco_mm.train.cli import main

sys.exit(main())
