"""Smoke test of `moco-mm bench`: the quick single-process run writes every ratio.

Speed is not asserted: the figures depend on the machine and its load.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from moco_mm.model.losses import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
RATIOS = ("a_over_c", "b_over_c", "a_over_d", "ema_over_copy", "floor_ratio",
          # every objective's loss time against queue InfoNCE's
          *(f"loss_{name}_over_infonce" for name in OBJECTIVES if name != "infonce"))


def test_quick_bench_writes_positive_finite_ratios(tmp_path):
    pytest.importorskip("open_clip", reason="the bench compares against OpenCLIP: pip install -e .[bench]")
    out = tmp_path / "bench.json"
    # --no-dist: the 2-process part would double the run time; the loader figure stays in.
    res = subprocess.run([sys.executable, "-m", "moco_mm.cli", "bench", "--quick", "--no-dist", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in RATIOS:
        value = data[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert "a_over_c" in res.stdout  # the table was printed
    assert "multi_similarity" in res.stdout  # and the objectives' table
