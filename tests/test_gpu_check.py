"""`moco-mm gpu-check`: the --dry-run end to end on the CPU (the code path a GPU machine runs,
with tiny towers, gloo and 2 processes), and its pieces: the planner's GpuSpec from a device,
the time budget and the report.

Figures are not asserted (they depend on the machine and its load); fields are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moco_mm.bench import gpu_check as gc
from moco_mm.plan import GIB, GpuSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "a100-40gb-vitb16-bertbase"
PLAN_FIELDS = ("peak_bytes", "required_bytes", "capacity_bytes", "fits", "max_batch_per_gpu", "parts")
RUN_FIELDS = ("steps", "warmup", "step_ms", "batch_per_gpu", "peak_alloc_bytes", "build_s")
OURS_FIELDS = ("loss_check", "planned_peak_bytes", "measured_over_planned", "autocast")
LOSS_FIELDS = ("loss_bf16", "loss_fp32", "abs_diff", "rel_diff", "rtol", "ok")
ENV_FIELDS = ("torch", "cuda", "nccl", "python", "world_size", "device")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `python tools/gpu_check.py --dry-run` of one shipped config (2 gloo processes)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    t = time.monotonic()
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--configs", CONFIG,
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res, out, time.monotonic() - t


def test_dry_run_writes_every_field(dry_run):
    res, out, _ = dry_run
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["dry_run"] is True and data["settings"]["nproc"] == 2
    assert all(k in data["environment"] for k in ENV_FIELDS)
    assert data["environment"]["world_size"] == 2
    (cell,) = data["configs"]
    assert cell["config"] == CONFIG and cell["status"] == "ok", cell
    assert cell["batch"] >= 1 and cell["batch_source"] == "config"
    for key in ("plan", "plan_clip"):
        assert all(f in cell[key] for f in PLAN_FIELDS), key
        assert cell[key]["peak_bytes"] > 0
    for mode in ("momentum", "clip"):
        v = cell["variants"][mode]
        assert v["status"] == "ok", v
        assert all(f in v for f in RUN_FIELDS + OURS_FIELDS), mode
        assert v["step_ms"] > 0 and v["steps"] == 2 and v["bad_steps"] == 0
        assert v["peak_alloc_bytes"] is None and v["measured_over_planned"] is None  # the CPU: n/a
        assert all(f in v["loss_check"] for f in LOSS_FIELDS)
        assert v["loss_check"]["ok"], v["loss_check"]  # bf16 autocast on the CPU against fp32
    oc = cell["variants"]["openclip"]
    try:
        import open_clip  # noqa: F401
        assert oc["status"] == "ok", oc
        assert all(f in oc for f in RUN_FIELDS)
    except ImportError:
        assert oc["status"] == "n/a" and "not installed" in oc["reason"]
    g = cell["gather"]  # 2 processes: the packed keys' all_gather is timed
    assert g["shape"] == [cell["batch"], 2 * cell["embed_dim"] + 8] and g["median_ms"] > 0 and g["calls"] == 50
    assert data["skipped"] == []


def test_dry_run_kill_and_resume_is_byte_identical(dry_run):
    _, out, _ = dry_run
    r = json.loads((out / "results.json").read_text())["resume"]
    assert r["status"] == "ok", r
    assert r["identical"] is True and r["sha256_uninterrupted"] == r["sha256_resumed"]
    killed = r["runs"]["killed"]
    # torchrun + 2 workers at least: the workers live in sessions of their own and must die too.
    assert killed["killed"] and killed["processes_killed"] >= 3
    assert f"step_{r['steps']:08d}" not in killed["checkpoints_after_kill"]
    assert 0 < r["runs"]["resumed"]["resumed_from_step"] < r["steps"]


def test_dry_run_markdown_has_a_row_per_config(dry_run):
    res, out, seconds = dry_run
    md = (out / "results.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {CONFIG} |")]
    assert len(rows) == 1 and rows[0].count("|") == 12
    assert "byte-identical" in md
    assert md.strip().splitlines()[2] in res.stdout  # the table was printed
    print(f"dry run took {seconds:.0f} s")


def test_gpu_spec_from_device_properties(monkeypatch):
    spec = gc.gpu_spec_from_properties("NVIDIA H100 80GB HBM3", 85_045_870_592)
    assert spec == GpuSpec("nvidia-h100-80gb-hbm3", 85_045_870_592, "NVIDIA H100 80GB HBM3")
    props = SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=int(39.5 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    got = gc.detect_gpu(0)
    assert got.name == "nvidia-a100-sxm4-40gb" and got.capacity_bytes == int(39.5 * GIB)
    assert got.label == "NVIDIA A100-SXM4-40GB"
    with pytest.raises(ValueError):
        gc.gpu_spec_from_properties("x", 0)


def test_the_planner_takes_a_device_spec():
    """The spec goes straight into `plan` (no table lookup): a 1 GiB device fits less."""
    from moco_mm import plan
    from moco_mm.config import load_config

    cfg = load_config(ROOT / "configs" / f"{CONFIG}.yaml", gc.dry_run_overrides(ROOT / "configs" / f"{CONFIG}.yaml"))
    big = plan.plan(cfg, gc.gpu_spec_from_properties("big", 80 * GIB), world_size=1)
    small = plan.plan(cfg, gc.gpu_spec_from_properties("small", 2 * GIB), world_size=1)
    assert big.gpu == "big" and small.capacity_bytes == 2 * GIB
    assert big.peak_bytes == small.peak_bytes and 0 < small.max_batch_per_gpu < big.max_batch_per_gpu


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_budget_allows_starts_until_spent():
    clock = Clock()
    b = gc.Budget(deadline=1100.0, min_start_s=20.0, clock=clock)
    assert b.allows_start() and b.left() == 100.0 and b.share(4) == 25.0
    assert not b.allows_start(need_s=150.0)  # a config known to need more than is left
    clock.t = 1085.0  # 15 s left: below min_start_s
    assert not b.allows_start()
    clock.t = 1200.0
    assert not b.allows_start() and b.share(3) == 0.0
    assert gc.Budget(deadline=1001.0, clock=Clock()).allows_start()  # no floor: any time left will do


def test_timed_steps_shrink_to_the_budget_but_not_below_the_floor():
    assert gc.timed_steps(0.5, 100.0, default=20) == 20  # fits: the default
    assert gc.timed_steps(0.5, 5.0, default=20) == 10  # shrinks to what fits
    assert gc.timed_steps(0.5, 0.1, default=20) == gc.MIN_STEPS  # never below the floor
    assert gc.timed_steps(0.5, -3.0, default=2) == 2  # a default below the floor stays
    assert gc.timed_steps(0.0, 1.0, default=7) == 7  # no warm-up estimate


def test_spent_budget_skips_and_lists_every_remaining_config():
    """run_configs with no time left runs nothing and reports each config as skipped."""
    paths = gc.resolve_configs([f"{CONFIG},a100-80gb-wenlan-large"])
    args = argparse.Namespace(dry_run=True, warmup=1, steps=2, no_openclip=True, overrides=[])
    seen = []
    threads = torch.get_num_threads()
    try:
        results = gc.run_configs(args, paths, gc.Budget(deadline=time.time() - 1), seen.append)
    finally:
        torch.set_num_threads(threads)  # run_configs sets the dry run's 1 thread
    assert results["skipped"] == [CONFIG, "a100-80gb-wenlan-large"]
    assert [c["status"] for c in results["configs"]] == ["skipped", "skipped"]
    assert seen == []  # nothing finished, nothing written
    md = gc.markdown_table({**results, "settings": {"dry_run": True, "steps": 2, "warmup": 1}})
    for name in results["skipped"]:
        assert sum(ln.startswith(f"| {name} | skipped") for ln in md.splitlines()) == 1
    assert "Skipped (time budget): " in md


def test_unknown_config_and_missing_gpu_exit_2(capsys):
    assert gc.main(["--dry-run", "--configs", "no-such-config", "--out", os.devnull]) == 2
    assert "no config 'no-such-config'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gc.main(["--configs", CONFIG]) == 2
        assert "--dry-run" in capsys.readouterr().err
