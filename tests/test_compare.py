"""`moco-mm compare-objectives`: trains each variant, prints the table, writes JSON, and
reuses finished runs when run again."""

from __future__ import annotations

import json

from moco_mm.bench.compare import ALL, main
from moco_mm.model.losses import OBJECTIVES
from tests.trainrun import tiny_train_config, write_config


def test_compare_objectives_trains_each_variant_and_reports(tmp_path, capsys, demo):
    assert set(OBJECTIVES) <= set(ALL) and {"queue-off", "distill", "no-dedup", "clip"} <= set(ALL)
    config = write_config(tiny_train_config(demo, tmp_path / "unused", data={"workers": 0}), tmp_path / "c.yaml")
    args = ["--config", str(config), "--steps", "4", "--batch-size", "8", "--variants", "infonce,clip",
            "--out", str(tmp_path / "cmp"), "--json", str(tmp_path / "t.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "training 4 steps" in out and "infonce" in out and "clip" in out
    table = json.loads((tmp_path / "t.json").read_text())
    for name in ("infonce", "clip"):
        r = table["results"][name]
        assert 0 <= r["i2t_R@1"] <= r["i2t_R@5"] <= 100 and r["step_s"] > 0
    assert main(args) == 0  # finished runs are reused, not retrained
    assert "training" not in capsys.readouterr().out
    import pytest

    with pytest.raises(SystemExit, match="unknown variant 'nonsense'"):
        main(["--variants", "nonsense"])
