"""Where a run reports: metrics.jsonl, the rank-0 progress bar, wandb and TensorBoard.

Each logger is built with `enabled` (true on rank 0 only), so the training loop calls
them unconditionally and other ranks stay quiet without `if rank == 0` at every call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moco_mm.config import TENSORBOARD_MISSING, Config, ConfigError, to_dict


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


class TensorBoardLogger:
    """logging.tensorboard: every metrics.jsonl record as scalars (same keys, `step` as the
    global step) in event files under `log_dir` (RUN_DIR/tensorboard/).

    On resume from step s the run appends a new event file to the same directory, starting
    with a purge at s + 1: TensorBoard (and its EventAccumulator) then drops whatever the
    interrupted run logged after its checkpoint, as MetricsLog drops those lines, so each
    step reads once, with the value of the run that went on from the checkpoint.
    """

    def __init__(self, log_dir: Path, enabled: bool, resume_step: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
        log_dir = Path(log_dir)
        earlier = log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*"))
        # A fresh directory needs no purge; after an earlier run (even one that stopped before
        # its first checkpoint, resume_step 0) every step past the checkpoint goes.
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if earlier else None)

    def log(self, m: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in m.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, float(value), global_step=step)  # NaN and inf too, as metrics.jsonl has them

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
