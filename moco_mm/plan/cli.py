"""`moco-mm plan-memory`: the planner's command line (argument parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from moco_mm import plan
from moco_mm.config import ConfigError, load_config

USAGE = """Will this config fit the GPU? Peak memory per GPU of one training step, before any run.

    moco-mm plan-memory --config configs/a100-40gb-vitb16-bertbase.yaml --gpu a100-40gb \
        [--world-size 8] [--parallel ddp|fsdp] [--json plan.json] [--vocab-size N] [--full-trace] [a.b.c=value ...]

Prints each part of the peak (weights, gradients, AdamW, DDP buckets, queues, traced
activations, logits, gathered keys; under --parallel fsdp the sharded state and the
all-gathered blocks and roots instead of whole weights), the margin, the verdict, the
largest per-GPU batch and the largest queue that fit. Exit status 0 when the config
fits, 1 when it does not, 2 on a bad config. Nothing is downloaded and no GPU is needed: the towers are traced
with fake tensors (see `moco_mm.plan`)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moco-mm plan-memory", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (as for moco-mm train)")
    ap.add_argument("--gpu", required=True, choices=sorted(plan.GPUS), help="the GPU to plan for")
    ap.add_argument("--world-size", type=int, default=8,
                    help="ranks in the run (default 8, one node): the global batch and so the logits depend on it")
    ap.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                    help="cost the step as run.parallel ddp (whole state on every GPU) or fsdp (state sharded "
                         "over the ranks); default: the config's run.parallel")
    ap.add_argument("--json", metavar="OUT", help="also write the plan as JSON here")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="text vocabulary (default: the tokenizer's if found, else the model type's default)")
    ap.add_argument("--full-trace", action="store_true",
                    help="trace every block instead of extrapolating runs of identical blocks (slower)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        ap.error(f"--world-size must be >= 1, got {args.world_size}")
    try:
        # --parallel goes last, so it wins over a run.parallel=... among the overrides.
        parallel = [f"run.parallel={args.parallel}"] if args.parallel else []
        cfg = load_config(args.config, [*args.overrides, *parallel], world_size=args.world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # timm/transformers warn about things irrelevant to memory (deprecated kwargs).
        warnings.simplefilter("ignore")
        try:
            result = plan.plan(cfg, args.gpu, args.world_size, vocab_size=args.vocab_size,
                                 depth_extrapolation=not args.full_trace)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
    print(result.table())
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": str(args.config), **result.to_dict()}, indent=2) + "\n")
    return 0 if result.fits else 1
