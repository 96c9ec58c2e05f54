"""Where a run reports: metrics.jsonl, the rank-0 progress bar, and wandb.

Each logger is built with `enabled` (true on rank 0 only), so the training loop calls
them unconditionally and other ranks stay quiet without `if rank == 0` at every call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moco_mm.config import Config, to_dict


class MetricsLog:
    """Appends one JSON object per logged step to `path`.

    On resume from step s, lines logged after s by the interrupted run are dropped first,
    so the file reads like one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _step_of(ln) is not None and _step_of(ln) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a kill


class ProgressBar:
    """tqdm bar with loss, lr and samples/s; tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update_to(self, step: int, m: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", sps=f"{m['samples_per_s']:.1f}",
                             refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WandbLogger:
    """logging.wandb: disabled (wandb is not even imported) | offline | online."""

    def __init__(self, cfg: Config, enabled: bool):
        self.run = None
        mode = cfg.logging.wandb
        if not enabled or mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            mode=mode, project=cfg.logging.project, name=cfg.logging.run_name or None,
            dir=cfg.run.output_dir, config=to_dict(cfg), resume="allow",
        )

    def log(self, m: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(m, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
