"""The training program: the Trainer, the checkpoint manager, run logging.

    trainer.py     Trainer: the loop, data position, counters, logging, eval
    step.py        TrainStep: one optimizer step (accumulation, non-finite skip, EMA, enqueue)
    parallel.py    run.parallel: the query towers in DDP, or all four towers sharded by FSDP2
    cli.py         the program: parse, validate the config, join the process group, train;
                   `moco-mm consolidate`
    checkpoint.py  atomic step directories, COMPLETE marker, rotation, RNG capture, background
                   writer; sharded (torch.distributed.checkpoint) checkpoints, consolidate
    preempt.py     SIGTERM / SIGUSR1: every rank checkpoints the same step, exit 75
    run_log.py     metrics.jsonl, the rank-0 progress bar, wandb, TensorBoard
    plot.py        `moco-mm plot`: PNGs of runs' metrics.jsonl (matplotlib)

`python -m moco_mm.train --config configs/NAME.yaml [dotted.key=value ...]` and
`moco-mm train ...` run `cli.main`.

Imports: the base modules, `moco_mm.model`, `moco_mm.data` and itself. Never plan,
search, bench or cli (search reads our checkpoints, never the reverse); tests/test_layout.py
checks this.
"""

from moco_mm.train.checkpoint import CheckpointError, CheckpointManager
from moco_mm.train.cli import main
from moco_mm.train.step import StepResult, TrainStep, build_optimizer, lr_at
from moco_mm.train.trainer import Trainer

__all__ = ["Trainer", "TrainStep", "StepResult", "build_optimizer", "lr_at",
           "main", "CheckpointManager", "CheckpointError"]
