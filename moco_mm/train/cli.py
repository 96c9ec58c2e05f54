"""`moco-mm train` / `python -m moco_mm.train`: parse, validate the config before any
compute, join the process group, train.

    moco-mm train --config configs/NAME.yaml [dotted.key=value ...]
    torchrun --nproc_per_node=8 -m moco_mm.train --config configs/NAME.yaml [dotted.key=value ...]
    moco-mm train --config configs/NAME.yaml --print-config [dotted.key=value ...]
    moco-mm train --help          # every config key with its type, default and help
    moco-mm consolidate RUN_DIR/checkpoints/step_NNNNNNNN --out DIR   # sharded -> model.safetensors

Exit status: 0 done, 2 bad config (the message starts with the key), 75 preempted by
SIGTERM / SIGUSR1 (a checkpoint of the stop step is written and RUN_DIR/PREEMPTED names it;
run the same command again: preempt.py), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from moco_mm import distributed as D
from moco_mm.config import ConfigError, config_yaml, describe_keys, load_config
from moco_mm.model.losses import validate_objective
from moco_mm.train.checkpoint import CheckpointError, CheckpointManager, consolidate
from moco_mm.train.kernels import configure_kernels
from moco_mm.train.trainer import Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="moco-mm train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Train the dual-queue model. The same line runs one process or, under torchrun, many;\n"
                     "dotted overrides are read as YAML values (optim.lr=2e-3 is a float)."),
        epilog="config keys (set in the YAML file or as dotted.key=value):\n\n" + describe_keys())
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (after overrides) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run.steps=100")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Validated before any process group, model or data loader exists.
        cfg = load_config(args.config, args.overrides, world_size=D.launcher_world_size())
        validate_objective(cfg.model)  # the objective's own parameters (model.loss_params)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    if cfg.run.deterministic:  # cuBLAS reads its workspace setting before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    info = D.init_distributed(cfg.run.device, cfg.run.process_group_timeout_s)
    configure_kernels(cfg.run, info.device)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # other ranks stay quiet
    try:
        Trainer(cfg, info).train()
    except ConfigError as e:  # what only the data can tell (eval.zeroshot.data against its classes, ...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        D.shutdown()
    return 0


def consolidate_main(argv=None) -> int:
    """`moco-mm consolidate`: a checkpoint (sharded or not) -> one whole-model checkpoint."""
    p = argparse.ArgumentParser(
        prog="moco-mm consolidate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Write a checkpoint's tensors whole into one model.safetensors (with its train_state.pt and\n"
                     "COMPLETE marker), e.g. a sharded run.parallel=fsdp checkpoint. No process group or GPU\n"
                     "is needed. The result serves `moco-mm export --checkpoint`, checkpoint.init_weights and\n"
                     "evaluation; a sharded checkpoint's optimizer state stays in the original. (export and\n"
                     "init_weights also read sharded checkpoints directly.)"))
    p.add_argument("checkpoint", help="a complete step directory (RUN_DIR/checkpoints/step_NNNNNNNN)")
    p.add_argument("--out", required=True, help="the new checkpoint directory (must not exist)")
    args = p.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except CheckpointError as e:
        print(f"consolidate: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'model.safetensors'}: step {CheckpointManager.step_of(out)} of {args.checkpoint}")
    return 0
