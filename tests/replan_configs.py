"""Rewrite the planner comment of every shipped A100 config from the current planner, and
print the README's planner table rows. Run after a change to what the planner costs
(tests/test_plan_memory.py::test_shipped_config_fits_its_gpu says when):

    python -m tests.replan_configs

Uses the kept tower profiles (tests/data/tower_profiles.json), as the test does.
"""

from __future__ import annotations

import re
import warnings

from tests import tower_profiles

COMMENT = re.compile(r"# Planner \(.*?\n# .*?\n# at this batch: \d+\.\n")


def main() -> None:
    from moco_mm import plan
    from moco_mm.config import load_config
    from moco_mm.plan import GIB

    for key, entry in tower_profiles.load()["towers"].items():
        plan.register_tower_profile(key, entry["profile"])
    for path in tower_profiles.shipped_configs():
        gpu = path.name[: len("a100-40gb")]
        cfg = load_config(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = plan.plan(cfg, gpu, world_size=8)
        comment = (f"# Planner (moco-mm plan-memory --gpu {gpu}, 8 GPUs): peak {p.peak_bytes / GIB:.2f} GiB + margin "
                   f"{p.margin_bytes / GIB:.2f} GiB\n# (10% + 1 GiB) = {p.required_bytes / GIB:.2f} of "
                   f"{p.capacity_bytes / GIB:.2f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}. Largest batch at this "
                   f"queue: {p.max_batch_per_gpu}/GPU; largest queue\n# at this batch: {p.max_queue_size}.\n")
        text = path.read_text()
        new, n = COMMENT.subn(comment, text)
        assert n == 1, f"{path.name}: planner comment not found"
        path.write_text(new)
        print(f"| {path.stem} | {p.batch_per_gpu} | {p.queue_size} | {cfg.model.embed_dim} | "
              f"{p.peak_bytes / GIB:.2f} GiB | {p.required_bytes / GIB:.2f} GiB | {p.capacity_bytes / GIB:.2f} GiB | "
              f"{p.max_batch_per_gpu} |")


if __name__ == "__main__":
    main()
